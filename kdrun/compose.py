"""Where kdrun's Hydra configs live (:func:`config_dir`) and the ``kdrun train`` config composed from
overrides outside the Hydra app (:func:`compose_config`, :func:`compose_train_config`): ``kdrun
cache-teacher``, the tests and the scripts compose exactly what ``kdrun train`` would run.

Its own module so that the CLI and the commands it starts can both import it without importing each other.
Importing :mod:`kdrun.config` here is what puts the ``trainer``/``logger`` schemas into Hydra's ConfigStore
(:func:`kdrun.config.register_group_defaults`) on every composition path. Hydra itself is imported only
when a config is composed (``kdrun --help`` does not pay for it)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig

from kdrun.config import ConfigError


def config_dir() -> Path:
    """``conf/`` beside the package (editable install or source checkout)."""
    here = Path(__file__).resolve().parent
    env = os.environ.get("KDRUN_CONFIG_DIR")
    for cand in ([Path(env)] if env else []) + [here.parent / "conf", here / "conf"]:
        if (cand / "config.yaml").is_file():
            return cand
    raise SystemExit("kdrun: cannot find the config directory (conf/) beside the package; install kdrun "
                     "from a source checkout with `pip install -e .` or set KDRUN_CONFIG_DIR.")


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The composed ``kdrun train`` config for ``overrides`` (Hydra's compose API over :func:`config_dir`);
    Hydra's own exceptions for an unknown option or key."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def compose_train_config(argv: Sequence[str]) -> DictConfig:
    """:func:`compose_config` for a command's user: an unknown option or key is a :class:`ConfigError`
    carrying the first paragraph of Hydra's message."""
    from hydra.errors import HydraException

    try:
        return compose_config(argv)
    except HydraException as e:  # unknown option/key: Hydra's own message, first paragraph
        raise ConfigError(f"cannot compose the config from {' '.join(argv) or 'no overrides'}: "
                          f"{str(e).strip().splitlines()[0]}") from None
