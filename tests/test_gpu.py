"""GPU smoke tests: skipped without CUDA (CI has none); run them on a GPU machine with
``python -m pytest tests/test_gpu.py``."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import QUICK, run

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("balancer", ["fixed", "dto", "dto_exact", "cross_batch", "upgrad"])
def test_cuda_bf16_channels_last_fused(digits_teacher: str, tmp_path: Path, balancer: str) -> None:
    over = [o for o in QUICK if not o.startswith("trainer.accelerator")]
    res = run(["teacher=convnet_l", f"teacher.checkpoint={digits_teacher}", "distill=kl", *over,
               "trainer.accelerator=cuda", "trainer.precision=bf16", "trainer.channels_last=true",
               "optimizer=adamw", f"balancer={balancer}", "trainer.max_steps=20", "trainer.epochs=1"], tmp_path)
    assert res["device"].startswith("cuda") and res["nonfinite_skipped"] == 0


def test_cuda_fp16_gradscaler_and_compile(digits_teacher: str, tmp_path: Path) -> None:
    over = [o for o in QUICK if not o.startswith("trainer.accelerator")]
    res = run(["teacher=convnet_l", f"teacher.checkpoint={digits_teacher}", "distill=kl", *over,
               "trainer.accelerator=cuda", "trainer.precision=fp16", "trainer.compile=true",
               "trainer.max_steps=20", "trainer.epochs=1"], tmp_path)
    assert res["steps"] == 20


def test_fused_optimiser_on_cuda() -> None:
    from kdrun.optim.optimizer import adamw

    m = torch.nn.Linear(4, 4).cuda()
    assert adamw(m).defaults.get("fused") is True
