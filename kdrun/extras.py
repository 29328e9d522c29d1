"""Optional dependencies (pyproject ``[project.optional-dependencies]``): which extra provides what, and
the one-paragraph hint when a feature is used without it.

``hydra/launcher=slurm`` (conf/hydra/launcher/slurm.yaml) builds on the ``submitit_slurm`` config that the
hydra-submitit-launcher plugin installs; without the plugin Hydra only says "Could not load
'hydra/launcher/submitit_slurm'", which does not tell a user what to install.
"""
from __future__ import annotations

from typing import Optional

# Config names that only a plugin provides -> (extra, pip package). Hydra reports them as missing configs.
PLUGIN_CONFIGS = {
    "hydra/launcher/submitit_slurm": ("slurm", "hydra-submitit-launcher"),
    "hydra/launcher/submitit_local": ("slurm", "hydra-submitit-launcher"),
}


def missing_extra_message(e: BaseException) -> Optional[str]:
    """The hint for a config composition that failed because a plugin extra is not installed, e.g.::

        hydra/launcher=slurm needs the hydra-submitit-launcher plugin, which is not installed:
        pip install -e ".[slurm]" (or pip install hydra-submitit-launcher). (Hydra: In
        'hydra/launcher/slurm': Could not load 'hydra/launcher/submitit_slurm'.)

    ``None`` for any other error. Meant for kdrun.cli's handling of errors Hydra raises before the task.
    """
    from hydra.errors import MissingConfigException

    if not isinstance(e, MissingConfigException):
        return None
    text = str(e)
    for config, (extra, package) in PLUGIN_CONFIGS.items():
        if f"'{config}'" in text or getattr(e, "missing_cfg_file", None) == config:
            first = text.strip().splitlines()[0].strip()
            option = config.rsplit("/", 1)[0]
            return (f"{option}=... needs the {package} plugin, which is not installed: pip install -e "
                    f"\".[{extra}]\" (or pip install {package}). (Hydra: {first})")
    return None
