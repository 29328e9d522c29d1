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


def test_cuda_detection_train_eval_and_bench(tmp_path: Path) -> None:
    """A tiny ViDT-nano detection run on the GPU (bf16), `kdrun eval` of it (COCO AP as logged, params,
    images/s on CUDA), and one row of scripts/bench_detection.py (CUDA peak memory)."""
    import json
    import math
    import sys

    from kdrun.commands.evaluate import evaluate_checkpoint
    from kdrun.tasks.detection import METRIC_KEYS

    res = run(["task=detection", "dataset=coco_synthetic", "dataset.train_size=8", "dataset.val_size=4",
               "dataset.image_size=96", "dataset.eval_size=96", "dataset.scales=[80,96]", "dataset.max_size=128",
               "dataset.crop_scales=[64,80]", "dataset.crop_size=[48,80]", "student=vidt_nano",
               "student.model.det_tokens=20", "student.model.dec_layers=2", "trainer.accelerator=cuda",
               "trainer.precision=bf16", "trainer.batch_size=2", "trainer.epochs=1", "trainer.max_steps=4",
               "optimizer=adamw", "optimizer.lr=1e-4", "scheduler=constant", "logger.progress=false"], tmp_path / "run")
    assert res["device"].startswith("cuda")
    m = evaluate_checkpoint(tmp_path / "run", warmup_batches=1)
    for k in METRIC_KEYS:
        # cuDNN's autotuned kernels may differ between the two processes' passes: close, not bit-equal
        assert m[k] == pytest.approx(res["final"][k], abs=0.02), k
    assert m["params"] > 1_000_000 and math.isfinite(m["images_per_s"]) and m["images_per_s"] > 0
    assert m["throughput_device"].startswith("cuda") and m["throughput_precision"] == "bf16"

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "scripts"))
    try:
        import bench_detection as bench
    finally:
        sys.path.pop(0)
    data = bench.make_fixed_size_set(tmp_path / "data", num_train=6, num_val=1, height=96, width=160)
    row = bench.run_one(dict(model="nano", mode="distill", teacher="small", data_root=str(data), image_size=96,
                             batch_size=2, steps=3, warmup=1, workers=0, device="cuda", precision="bf16",
                             det_tokens=20, dec_layers=2, num_classes=91))
    assert row["peak_mem_kind"] == "cuda max_memory_allocated" and row["peak_mem_bytes"] > 0, json.dumps(row)
    assert row["images_per_s"] > 0 and row["teacher_params"] > row["params"]
