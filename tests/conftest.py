"""Shared fixtures: config composition, an isolated teacher cache, quick digits runs."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

os.environ.setdefault("KDRUN_CACHE", str(Path(__file__).resolve().parent / ".cache"))
torch.set_num_threads(min(2, os.cpu_count() or 1))

from omegaconf import DictConfig, OmegaConf  # noqa: E402

from kdrun.compose import compose_config, config_dir  # noqa: E402

CONF = config_dir()

# A digits run that takes seconds: the selectable preset conf/debug/quick.yaml (diagnostics on every 5th
# step, no warm-up), on the CPU (a separate override: tests/test_gpu.py drops it to run on CUDA).
QUICK = ["+debug=quick", "trainer.accelerator=cpu"]


def compose_cfg(overrides: list[str] = ()) -> DictConfig:
    """The ``kdrun train`` config for ``overrides``, composed by kdrun's own function (Hydra's exceptions
    pass through: tests assert on them)."""
    return compose_config(overrides)


def run(overrides: list[str], run_dir: Path) -> dict[str, Any]:
    from kdrun.engine import train

    return train(compose_cfg(list(overrides)), run_dir)


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A digits ConvNet teacher trained once per session (the quickstart's fit-if-missing path, which fits
    only into the teacher cache: $KDRUN_CACHE points at a fresh one while it runs)."""
    cache = tmp_path_factory.mktemp("kdrun_cache")
    path = cache / "teachers" / "convnet_l.pt"
    old = os.environ.get("KDRUN_CACHE")
    os.environ["KDRUN_CACHE"] = str(cache)
    try:
        run(["teacher=convnet_l", f"teacher.checkpoint={path}", "teacher.fit_if_missing_epochs=4",
             "distill=kl", "trainer.epochs=1", "trainer.max_steps=1", *QUICK],
            tmp_path_factory.mktemp("fit_probe"))
    finally:
        if old is None:
            os.environ.pop("KDRUN_CACHE", None)
        else:
            os.environ["KDRUN_CACHE"] = old
    assert path.is_file()
    return str(path)


def event_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Read back every scalar TensorBoard wrote in ``run_dir/tb``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def to_plain(cfg: DictConfig) -> Any:
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.fixture
def kdrun_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> Callable[..., tuple[int, str, str]]:
    """``kdrun_cli(*argv)`` → (exit status, stdout, stderr) of ``kdrun.cli.main`` run in this process (the
    one in-process CLI runner; test modules narrow it to what they read)."""
    from hydra.core.global_hydra import GlobalHydra

    from kdrun import cli

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr(sys, "argv", ["kdrun"])  # run_train sets it for Hydra

    def call(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            cli.main(list(argv))
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:
            GlobalHydra.instance().clear()  # hydra.main leaves it initialised
        out = capsys.readouterr()
        return code, out.out, out.err

    return call
