"""Precision, memory-format and data-loading switches each run and train."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from kdrun.runtime import checkpoint as ckpt
from tests.conftest import QUICK, run


@pytest.mark.parametrize("switches", [
    ["trainer.precision=bf16"],
    ["trainer.precision=fp16"],
    ["trainer.precision=bf16", "trainer.teacher_precision=fp32"],
    ["trainer.channels_last=true"],
    ["trainer.num_workers=2"],
    ["trainer.grad_clip=0.1"],
    ["optimizer=adamw", "scheduler=cosine", "scheduler.warmup_epochs=0.1"],
], ids=lambda s: ",".join(s))
def test_switch_runs(digits_teacher: str, tmp_path: Path, switches: list[str]) -> None:
    res = run(["teacher=convnet_l", f"teacher.checkpoint={digits_teacher}", "distill=kl", *QUICK,
               "trainer.max_steps=6", "trainer.epochs=1", *switches], tmp_path)
    assert res["steps"] == 6
    assert math.isfinite(res["final"]["loss"])
    state = ckpt.load(tmp_path / "last.pt")
    if "trainer.precision=fp16" in switches:
        assert state["scaler"]["scale"] > 0
    assert all(torch.isfinite(v).all() for v in state["student"].values() if v.is_floating_point())


def test_process_with_live_persistent_loader_workers_exits() -> None:
    """Loader workers ignore stop signals, so multiprocessing's exit-time terminate() cannot stop them:
    loaders still referenced at interpreter exit must be shut down by kdrun's exit hook, or the exit
    join hangs (as it once did at the end of the test suite)."""
    import subprocess
    import sys

    code = """
import torch
from omegaconf import OmegaConf
from hydra.utils import instantiate
from kdrun.config import TrainerConfig
from kdrun.data.loaders import make_loaders
from tests.conftest import compose_cfg, QUICK
cfg = compose_cfg([*QUICK, "trainer.num_workers=2"])
t = TrainerConfig(**OmegaConf.to_container(cfg.trainer, resolve=True))
KEEP = make_loaders(instantiate(cfg.dataset), t, 0, torch.device("cpu"), aux=False, task=instantiate(cfg.task))
next(iter(KEEP.train))  # starts the persistent workers; KEEP stays alive until exit
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_batched_and_looped_jacobians_train_the_same_student(digits_teacher: str, tmp_path: Path) -> None:
    """trainer.jacobian=batched (one vmapped backward) and =loop (one backward per objective) give the
    same parameters after a few exact-DTO steps through the engine (a projector makes private params)."""
    common = ["teacher=convnet_l", f"teacher.checkpoint={digits_teacher}", "distill=[kl,fitnet]",
              "projector=linear", "balancer=dto_exact", *QUICK, "trainer.max_steps=4", "trainer.epochs=1"]
    run([*common, "trainer.jacobian=loop"], tmp_path / "loop")
    run([*common, "trainer.jacobian=batched"], tmp_path / "batched")
    a, b = ckpt.load(tmp_path / "loop" / "last.pt"), ckpt.load(tmp_path / "batched" / "last.pt")
    assert a["trainable"].keys() == b["trainable"].keys()
    assert any(k.startswith("distill.") for k in a["trainable"])  # the projector is in the update
    for k, va in a["trainable"].items():
        if va.is_floating_point():
            torch.testing.assert_close(b["trainable"][k], va, rtol=1e-4, atol=1e-5, msg=k)
    init = run([*common, "trainer.jacobian=loop", "trainer.max_steps=1"], tmp_path / "one")
    assert init["steps"] == 1
    one = ckpt.load(tmp_path / "one" / "last.pt")["trainable"]
    assert any(not torch.allclose(one[k], a["trainable"][k]) for k in one if one[k].is_floating_point())
