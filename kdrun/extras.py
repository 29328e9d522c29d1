"""Optional dependencies (pyproject ``[project.optional-dependencies]``): which extra provides what, and
the one-paragraph hint when a feature is used without it.

``hydra/launcher=slurm`` (conf/hydra/launcher/slurm.yaml) builds on the ``submitit_slurm`` config that the
hydra-submitit-launcher plugin installs; without the plugin Hydra only says "Could not load
'hydra/launcher/submitit_slurm'", which does not tell a user what to install.

``logger.backends=[...,wandb]`` / ``[...,mlflow]`` (kdrun.runtime.log_backends) need the ``[wandb]`` /
``[mlflow]`` extra; :func:`missing_backend_message` says so before the run writes anything.
"""
from __future__ import annotations

from importlib.util import find_spec
from typing import Optional

# Config names that only a plugin provides -> (extra, pip package). Hydra reports them as missing configs.
PLUGIN_CONFIGS = {
    "hydra/launcher/submitit_slurm": ("slurm", "hydra-submitit-launcher"),
    "hydra/launcher/submitit_local": ("slurm", "hydra-submitit-launcher"),
}

# logger.backends names that need an extra -> (extra, pip package, the module it provides).
BACKEND_EXTRAS = {
    "wandb": ("wandb", "wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow-skinny", "mlflow"),  # mlflow-skinny: the client alone (no server, no UI)
}


def missing_backend_message(name: str) -> Optional[str]:
    """The hint for a ``logger.backends`` entry whose package is not installed, e.g.::

        logger.backends includes wandb, but the wandb package is not installed: pip install -e ".[wandb]"
        (or pip install wandb), or leave wandb out of logger.backends.

    ``None`` when it is installed or needs no extra (tensorboard). The package is looked up, not imported
    (W&B and MLflow take a second or more to import)."""
    if name not in BACKEND_EXTRAS:
        return None
    extra, package, module = BACKEND_EXTRAS[name]
    if find_spec(module) is not None:
        return None
    return (f"logger.backends includes {name}, but the {package} package is not installed: pip install -e "
            f"\".[{extra}]\" (or pip install {package}), or leave {name} out of logger.backends.")


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
