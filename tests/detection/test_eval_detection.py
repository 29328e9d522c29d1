"""`kdrun eval` on detection and classification runs (metrics as logged, params, inference images/s),
the throughput measurement itself, and scripts/bench_detection.py (training-step throughput)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from kdrun.commands.evaluate import evaluate_checkpoint, format_summary, measure_throughput
from kdrun.tasks.detection import METRIC_KEYS
from tests.conftest import QUICK, run

ROOT = Path(__file__).resolve().parents[2]

TINY = [
    "task=detection", "dataset=coco_synthetic", "dataset.train_size=4", "dataset.val_size=8",
    "dataset.image_size=64", "dataset.max_objects=4", "dataset.scales=[48,64]", "dataset.max_size=80",
    "dataset.crop_scales=[40,48]", "dataset.crop_size=[32,48]", "dataset.eval_size=64",
    "student=vidt_nano", "student.model.det_tokens=30", "student.model.dec_layers=2",
    "trainer.accelerator=cpu", "trainer.batch_size=2", "trainer.epochs=1", "trainer.max_steps=2",
    "optimizer=adamw", "optimizer.lr=1e-3", "scheduler=constant",
    "logger.log_every=1", "logger.grad_stats_every=0", "logger.progress=false", "logger.backends=[]",
]


@pytest.fixture(scope="module")
def detection_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the folder's one-thread fixture is function-scoped
    try:
        run_dir = tmp_path_factory.mktemp("det_run")
        return run_dir, run(TINY, run_dir)
    finally:
        torch.set_num_threads(threads)


def _logged_val(run_dir: Path) -> dict[str, float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if line.get("kind") == "val"][-1]


def test_eval_reproduces_the_logged_ap_and_reports_params_and_speed(detection_run, tmp_path: Path) -> None:
    run_dir, res = detection_run
    dets = tmp_path / "dets.json"
    m = evaluate_checkpoint(run_dir, detections_path=dets, warmup_batches=1, max_batches=3)
    logged = _logged_val(run_dir)
    for k in METRIC_KEYS:
        assert m[k] == pytest.approx(res["final"][k], abs=1e-12), k
        assert m[k] == pytest.approx(logged[f"val/{k}"], abs=1e-6), k
    # the strongest check: the same detections, score for score and box for box, as the run's last val
    assert json.loads(dets.read_text()) == json.loads((run_dir / "val_detections.json").read_text())
    assert m["images"] == 8 and m["detections"] == 8 * 100  # the task's top 100 of 30 queries × 4 classes

    from kdrun.models.vidt import vidt_nano

    assert m["params"] == sum(p.numel() for p in vidt_nano(num_classes=4, det_tokens=30, dec_layers=2).parameters())
    assert m["model"] == "kdrun.models.vidt.vidt_nano" and m["checkpoint"].endswith("best.pt")
    assert math.isfinite(m["images_per_s"]) and m["images_per_s"] > 0
    assert 0 < m["images_per_s_with_loading"] <= m["images_per_s"]
    assert m["throughput_batch_size"] == 4  # the val loader's: 2 × trainer.batch_size
    assert m["throughput_batches"] == 3 and m["throughput_images"] == 3 * 4 and m["throughput_warmup_batches"] == 1
    assert m["throughput_precision"] == "fp32" and m["throughput_device"].startswith("cpu")
    text = format_summary(m)
    assert "AP50" in text and "params" in text and "images/s" in text and "batch 4" in text
    # --no-throughput: the metrics alone
    quick = evaluate_checkpoint(run_dir, throughput=False)
    assert "images_per_s" not in quick and quick["AP"] == m["AP"] and quick["params"] == m["params"]


def test_cli_eval_json_and_summary(detection_run, capsys: pytest.CaptureFixture) -> None:
    run_dir, res = detection_run
    out = subprocess.run([sys.executable, "-m", "kdrun.cli", "eval", str(run_dir), "--json", "--warmup", "1",
                          "--max-batches", "2", "--batch-size", "1"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    m = json.loads(out.stdout)
    for k in METRIC_KEYS:
        assert m[k] == pytest.approx(res["final"][k], abs=1e-12), k
    assert m["throughput_batch_size"] == 1 and m["throughput_batches"] == 2 and m["images_per_s"] > 0
    assert isinstance(m["params"], int) and m["params"] > 1_000_000

    from kdrun.cli import main

    main(["eval", str(run_dir), "--warmup", "0", "--max-batches", "1"])
    text = capsys.readouterr().out
    assert text.startswith("kdrun eval") and "AP " in text and " M (" in text and "images/s" in text


class _Slow(Dataset):
    """Each item costs ``delay`` seconds of 'data loading'."""

    def __init__(self, n: int, delay: float) -> None:
        self.n, self.delay = n, delay

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        time.sleep(self.delay)
        return torch.zeros(3), 0


class _SlowModel(torch.nn.Module):
    """``step`` seconds per forward; the first forward costs ``first`` seconds (a warm-up)."""

    def __init__(self, step: float, first: float) -> None:
        super().__init__()
        self.lin, self.step, self.first, self.calls = torch.nn.Linear(3, 4), step, first, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.first if self.calls == 0 else self.step)
        self.calls += 1
        return self.lin(x)


class _Task:
    def __init__(self) -> None:
        self.post_calls = 0

    @staticmethod
    def batch_to_device(batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, None]:
        return batch[0].to(device), batch[1].to(device), None

    @staticmethod
    def batch_size(x: torch.Tensor) -> int:
        return len(x)

    def postprocess(self, out: torch.Tensor, targets: Any) -> Any:
        self.post_calls += 1
        return out.topk(2)


def test_throughput_times_forward_and_postprocess_only_after_the_warmup() -> None:
    """Loading (25 ms per batch of 2 here) and the warm-up forward (1 s) are not timed; a val split of 2
    batches is cycled until 5 batches are timed."""
    model, task = _SlowModel(step=0.02, first=1.0).train(), _Task()
    loader = DataLoader(_Slow(4, 0.0125), batch_size=2)
    m = measure_throughput(model, loader, task, torch.device("cpu"), warmup_batches=1)
    assert model.training  # restored
    assert model.calls == 6 and task.post_calls == 6
    assert m["throughput_batches"] == 5 and m["throughput_images"] == 10 and m["throughput_batch_size"] == 2
    # 20 ms per timed batch of 2 → at most 100 images/s; with the 1 s warm-up in it, under 10
    assert 20 < m["images_per_s"] <= 100 * 1.01
    assert m["images_per_s_with_loading"] < 0.9 * m["images_per_s"]  # 45 ms per batch with loading
    capped = measure_throughput(model, loader, task, torch.device("cpu"), warmup_batches=0, max_batches=1)
    assert capped["throughput_batches"] == 1 and capped["throughput_warmup_batches"] == 0


def test_classification_eval_reports_params_and_speed(tmp_path: Path) -> None:
    res = run([*QUICK, "trainer.max_steps=2", "trainer.epochs=1"], tmp_path)
    m = evaluate_checkpoint(tmp_path / "last.pt", warmup_batches=1)
    assert m["top1"] == pytest.approx(res["final"]["top1"], abs=1e-9) and m["samples"] == 359
    from hydra.utils import instantiate

    from tests.conftest import compose_cfg

    student = instantiate(compose_cfg(QUICK).student.model)
    assert m["params"] == sum(p.numel() for p in student.parameters())
    assert math.isfinite(m["images_per_s"]) and m["images_per_s"] > 0
    assert m["throughput_batch_size"] == 128 and m["throughput_batches"] == 5  # 3 val batches, cycled
    assert "top1" in format_summary(m) and "images/s" in format_summary(m)


# -- scripts/bench_detection.py --------------------------------------------------------------------

@pytest.fixture(scope="module")
def bench() -> Any:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import bench_detection
    finally:
        sys.path.pop(0)
    return bench_detection


def test_bench_overrides_table_and_result_lines(bench: Any) -> None:
    spec = dict(model="tiny", mode="distill", teacher="base", data_root="/d", image_size=800, batch_size=2,
                steps=15, warmup=5, workers=4, device="cuda", precision="bf16", det_tokens=100, dec_layers=6,
                num_classes=91)
    over = bench.overrides(spec)
    assert {"teacher=vidt_base", "distill=token_matching", "student=vidt_tiny", "dataset.max_size=1333",
            "trainer.precision=bf16", "dataset.train_size=30", "trainer.max_steps=15"} <= set(over)
    assert bench.input_size(800) == (800, 1333) and bench.input_size(128) == (128, 213)
    plain = bench.overrides(dict(spec, mode="plain"))
    assert not any(o.startswith(("teacher=", "distill=")) for o in plain)
    with pytest.raises(ValueError, match="mode"):
        bench.overrides(dict(spec, mode="kd"))
    from kdrun.config import validate
    from tests.conftest import compose_cfg

    validate(compose_cfg(over))  # every override names a real key with a valid value

    # the projector / clipping / VkD rows pick what they say, and compose into valid configs
    from hydra.utils import get_object

    for mode, want in (("proj_shared", ("Orthogonal", "Fixed", "shared")),
                       ("proj_per_scale", ("Orthogonal", "Fixed", "per_scale")),
                       ("clip", ("Orthogonal", "ObjectiveClip", "per_scale")), ("vkd", ("Orthogonal", "Fixed", None))):
        cfg = compose_cfg(bench.overrides(dict(spec, mode=mode)))
        validate(cfg)
        (term,) = cfg.distill.values()
        assert (cfg.projector._target_.rsplit(".", 1)[1], cfg.balancer._target_.rsplit(".", 1)[1],
                term.get("patch_projectors")) == want, mode
        assert get_object(term._target_).__name__ == ("VkDDetection" if mode == "vkd" else "TokenMatching")
    assert compose_cfg(bench.overrides(dict(spec, mode="vkd"))).projector.affine is True

    rows = [dict(model="tiny", mode="plain", teacher="base", params=37.4e6, s_per_step=0.1, images_per_s=20.0,
                 peak_mem_bytes=3 * 2**30),
            dict(model="tiny", mode="distill", teacher="base", params=37.4e6, teacher_params=99e6, s_per_step=0.25,
                 images_per_s=8.0, peak_mem_bytes=5 * 2**30),
            dict(model="base", mode="distill", teacher="base", error="out of memory")]
    meta = dict(spec, date="2026-01-01", machine="GPU X", command="python scripts/bench_detection.py --device cuda",
                loader_images_per_s=120.0)
    table = bench.format_table(rows, meta)
    assert "2026-01-01, GPU X" in table and "`python scripts/bench_detection.py --device cuda`" in table
    assert "inputs 800×1333" in table and "Median of 10 steps after 5 warm-up" in table and "smoke" not in table
    assert "| ViDT-tiny | 37.4 M | — | 100.0 | 20.00 | — | 3.00 GiB |" in table
    assert "| ViDT-tiny | 37.4 M | token matching ← ViDT-base (99.0 M) | 250.0 | 8.00 | 2.50 | 5.00 GiB |" in table
    assert "| ViDT-base | — | token matching ← ViDT-base | out of memory |" in table
    assert "max_memory_allocated" in table
    assert bench.parse_result("noise\nBENCH_RESULT {\"a\": 1}\nBENCH_RESULT {\"a\": 2}\n") == {"a": 2}
    assert bench.parse_result("no result") is None


def test_bench_runs_rows_through_the_engine(bench: Any, tmp_path: Path) -> None:
    from PIL import Image

    root = bench.make_fixed_size_set(tmp_path / "data", num_train=6, num_val=1, height=48, width=80)
    ann = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    for im in ann["images"]:
        assert (im["width"], im["height"]) == (80, 48) and im["file_name"].endswith(".jpg")
        with Image.open(root / "train2017" / im["file_name"]) as img:
            assert img.size == (80, 48)
    for a in ann["annotations"]:
        x, y, w, h = a["bbox"]
        assert 0 <= x and x + w <= 80 + 1e-6 and 0 <= y and y + h <= 48 + 1e-6

    spec = dict(model="nano", mode="plain", teacher="small", data_root=str(root), image_size=48, batch_size=2,
                steps=3, warmup=1, workers=0, device="cpu", precision="fp32", det_tokens=10, dec_layers=1,
                num_classes=91, threads=1)
    row = bench.run_one(spec)
    assert row["steps_timed"] == 2 and row["images_per_s"] > 0 and math.isfinite(row["s_per_step"])
    assert row["s_per_step_min"] <= row["s_per_step"] <= row["s_per_step_max"]
    assert row["images_per_s"] == pytest.approx(2 / row["s_per_step"])
    assert row["peak_mem_bytes"] >= 0 and row["peak_mem_kind"] == "peak RSS growth"
    from kdrun.models.vidt import vidt_nano

    assert row["params"] == sum(p.numel() for p in vidt_nano(num_classes=91, det_tokens=10, dec_layers=1).parameters())


@pytest.mark.slow
def test_bench_script_end_to_end_with_a_teacher(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_detection.py"), "--models", "nano",
                          "--modes", "distill", "--teacher", "small", "--image-size", "48", "--batch-size", "1",
                          "--steps", "3", "--warmup", "1", "--det-tokens", "10", "--dec-layers", "1",
                          "--threads", "1", "--json", str(tmp_path / "b.json")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| ViDT-nano |" in out.stdout and "token matching ← ViDT-small" in out.stdout
    saved = json.loads((tmp_path / "b.json").read_text())
    (row,) = saved["rows"]
    assert row["mode"] == "distill" and row["images_per_s"] > 0 and row["teacher_params"] > row["params"]
    assert saved["meta"]["steps"] == 3 and "bench_detection.py --models nano" in saved["meta"]["command"]
