"""Optional extras: a feature used without its extra says what to install (kdrun.extras)."""
from __future__ import annotations

import importlib.util

import pytest

from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException

from kdrun.cli import config_dir
from kdrun.extras import missing_extra_message


def test_slurm_launcher_without_the_plugin_names_the_extra() -> None:
    e = MissingConfigException("In 'hydra/launcher/slurm': Could not load 'hydra/launcher/submitit_slurm'.",
                               missing_cfg_file="hydra/launcher/submitit_slurm")
    msg = missing_extra_message(e)
    assert msg is not None and 'pip install -e ".[slurm]"' in msg and "hydra-submitit-launcher" in msg
    assert "Could not load 'hydra/launcher/submitit_slurm'" in msg  # Hydra's own words kept
    assert missing_extra_message(MissingConfigException("Could not find 'balancer/dtoo'")) is None
    assert missing_extra_message(ValueError("x")) is None


def _slurm_plugin_installed() -> bool:
    """find_spec of a dotted name imports its parent, and raises ModuleNotFoundError (rather than returning
    None) when the namespace package `hydra_plugins` itself is absent, i.e. no Hydra plugin is installed."""
    try:
        return importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None
    except ModuleNotFoundError:
        return False


def test_the_real_composition_error_is_recognised() -> None:
    """What Hydra raises for `kdrun train -m hydra/launcher=slurm` in this environment: composes when the
    plugin is installed (pip install -e .[slurm]), else exactly the error the hint is for."""
    plugin = _slurm_plugin_installed()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        try:
            cfg = compose(config_name="config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
        except MissingConfigException as e:
            assert not plugin
            assert "[slurm]" in (missing_extra_message(e) or "")
        else:
            assert plugin and cfg.hydra.launcher._target_.endswith("SlurmLauncher")


def test_cli_names_the_extra_for_the_slurm_launcher(capsys: pytest.CaptureFixture[str]) -> None:
    """Through `kdrun train` itself: the hint, exit 2 (hydra-submitit-launcher is not a test dependency)."""
    pytest.importorskip("hydra")
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
        pytest.skip("the slurm extra is installed here")
    except ImportError:
        pass
    from kdrun.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "hydra/launcher=slurm", "trainer.max_steps=1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert '.[slurm]' in err and "Traceback" not in err
