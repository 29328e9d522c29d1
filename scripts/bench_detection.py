#!/usr/bin/env python
"""Training-step throughput and peak memory of ViDT students, without and with token-matching
distillation from a frozen ViDT teacher, through the real engine (``kdrun.engine.train``).

Each (student, mode) row is one ``kdrun train task=detection dataset=coco_synthetic student=vidt_<s>``
run of ``--steps`` optimiser steps in a fresh Python process (so that peak-memory figures do not
carry over between rows):

* ``plain``: no teacher, the task's loss only (focal + L1 + GIoU on every prediction level);
* ``distill``: ``teacher=vidt_<--teacher> distill=token_matching`` (frozen teacher, its forward under
  ``torch.inference_mode()``, as the engine always does), fixed balancer;
* ``proj_shared`` / ``proj_per_scale``: ``distill`` through ``projector=orthogonal`` (DTO-KD's), one
  projector for all four [PATCH] scales vs one per scale
  (``distill.token_matching.patch_projectors=shared|per_scale``);
* ``clip``: ``proj_per_scale`` with per-objective gradient clipping (``balancer=objective_clip_fixed``:
  the Jacobian of both objectives, ``trainer.jacobian=auto``, then fixed weights);
* ``vkd``: VkD's ViDT loss (``distill=token_matching_vkd``, its per-scale ``OrthogonalLinear``
  projectors: ``projector=orthogonal projector.affine=true projector.teacher_norm=none``).

Model settings are ViDT's: 100 [DET] tokens, 6 decoder layers, 91 class outputs (COCO's), AdamW
(lr 1e-4), gradient clipping 0.1. Inputs: a synthetic COCO-format set (drawn shapes, JPEG) written at a
fixed size of ``--image-size`` × ``--image-size``·1333/800 (800 → 800×1333, the COCO evaluation
size; 128 → 128×213), through kdrun's COCO pipeline without augmentation, so that every step sees the
same input shape (no padding, and no cuDNN re-tuning on new shapes after the warm-up).

Step time: the engine logs ``train/images_per_s`` on every step (``logger.log_every=1``), measured
between consecutive steps after its per-step host sync, so GPU time is included; a step's time
therefore also includes any wait for the data loader (the table's header reports the loader's own
rate, which should be far above the training rate). Reported: the median over the steps after
``--warmup``, as ms/step and images/s (batch / median step time).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated()`` over the engine run (peak stats reset just
before it); on the CPU the growth of the process's peak resident set size (``resource.getrusage``'s
``ru_maxrss``) over the engine run, baseline taken after imports, just before it. Both runs include
one val image evaluated at batch 1 by the teacher and the student, which needs far less than a step.

    python scripts/bench_detection.py                                  # CPU, 128×213, batch 2, nano/tiny/small
    python scripts/bench_detection.py --device cuda --precision bf16   # 800×1333, batch 2
    python scripts/bench_detection.py --device cuda --base --batch-size 4 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

MODELS = ("nano", "tiny", "small", "base")
MODES = ("plain", "distill", "proj_shared", "proj_per_scale", "clip", "vkd")
MODE_LABEL = {"distill": "token matching", "proj_shared": "token matching, 1 orthogonal projector for the 4 scales",
              "proj_per_scale": "token matching, orthogonal projector per scale",
              "clip": "per scale + per-objective clipping", "vkd": "VkD's loss (per-scale OrthogonalLinear)"}
# the extra overrides of each distillation mode (on top of the teacher)
MODE_OVERRIDES = {
    "distill": ["distill=token_matching"],
    "proj_shared": ["distill=token_matching", "projector=orthogonal", "distill.token_matching.patch_projectors=shared"],
    "proj_per_scale": ["distill=token_matching", "projector=orthogonal",
                       "distill.token_matching.patch_projectors=per_scale"],
    "clip": ["distill=token_matching", "projector=orthogonal", "distill.token_matching.patch_projectors=per_scale",
             "balancer=objective_clip_fixed"],
    "vkd": ["distill=token_matching_vkd", "projector=orthogonal", "projector.affine=true",
            "projector.teacher_norm=none"],
}
TEACHERS = ("base", "small")  # conf/teacher/vidt_<name>.yaml
RESULT = "BENCH_RESULT "


def input_size(image_size: int) -> tuple[int, int]:
    """(height, width) of every input: the shorter side ``image_size``, the longer COCO's 1333/800 of it
    (rounded down, so that DETR's resize with ``max_size = size·1333/800`` leaves it unchanged)."""
    return image_size, image_size * 1333 // 800


def make_fixed_size_set(root: Path, num_train: int, num_val: int, height: int, width: int, seed: int = 0) -> Path:
    """kdrun's synthetic COCO-format set, every image resized to ``width`` × ``height`` (boxes scaled
    with it) and stored as JPEG, as COCO's images are."""
    from PIL import Image

    from kdrun.data.coco import make_synthetic_coco

    make_synthetic_coco(root, num_train=num_train, num_val=num_val, image_size=height, num_classes=3,
                        max_objects=4, seed=seed)
    for split in ("train2017", "val2017"):
        ann_path = root / "annotations" / f"instances_{split}.json"
        data = json.loads(ann_path.read_text())
        scale = {}
        for im in data["images"]:
            src = root / split / im["file_name"]
            with Image.open(src) as img:
                img.convert("RGB").resize((width, height), Image.BILINEAR).save(src.with_suffix(".jpg"), quality=90)
            src.unlink()
            scale[im["id"]] = (width / im["width"], height / im["height"])
            im.update(file_name=src.with_suffix(".jpg").name, width=width, height=height)
        for a in data["annotations"]:
            sx, sy = scale[a["image_id"]]
            x, y, w, h = a["bbox"]
            a["bbox"] = [x * sx, y * sy, w * sx, h * sy]
            a["area"] = a["area"] * sx * sy
        ann_path.write_text(json.dumps(data))
    return root


def overrides(spec: dict[str, Any]) -> list[str]:
    """The ``kdrun train`` overrides of one row."""
    size = int(spec["image_size"])
    over = [
        "task=detection", "dataset=coco_synthetic", f"dataset.root={spec['data_root']}",
        f"dataset.train_size={spec['batch_size'] * spec['steps']}", "dataset.val_size=1",
        f"dataset.image_size={size}", f"dataset.eval_size={size}", f"dataset.scales=[{size}]",
        f"dataset.max_size={input_size(size)[1]}", "dataset.augment=false",
        f"student=vidt_{spec['model']}", f"student.model.num_classes={spec['num_classes']}",
        f"student.model.det_tokens={spec['det_tokens']}", f"student.model.dec_layers={spec['dec_layers']}",
        f"trainer.accelerator={spec['device']}", f"trainer.precision={spec['precision']}",
        f"trainer.batch_size={spec['batch_size']}", "trainer.val_batch_size=1",
        f"trainer.num_workers={spec['workers']}", f"trainer.max_steps={spec['steps']}", "trainer.epochs=1",
        "trainer.grad_clip=0.1", "trainer.save_last=false", "trainer.save_best=false",
        "optimizer=adamw", "optimizer.lr=1e-4", "scheduler=constant", f"seed={spec.get('seed', 0)}",
        "logger.log_every=1", "logger.grad_stats_every=0", "logger.progress=false", "logger.backends=[]",
    ]
    if spec["mode"] in MODE_OVERRIDES:
        over += [f"teacher=vidt_{spec['teacher']}", "teacher.allow_random=true",
                 f"teacher.model.num_classes={spec['num_classes']}",
                 f"teacher.model.det_tokens={spec['det_tokens']}", f"teacher.model.dec_layers={spec['dec_layers']}",
                 *MODE_OVERRIDES[spec["mode"]]]
    elif spec["mode"] != "plain":
        raise ValueError(f"mode {spec['mode']!r} is not one of {MODES}")
    return over


def _peak_rss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # bytes on macOS, KiB on Linux


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """One row, in this process: train ``spec['steps']`` steps through the engine, return the figures."""
    import torch
    from hydra import compose, initialize_config_dir

    from kdrun.cli import config_dir
    from kdrun.engine import train

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides(spec))
    cuda = spec["device"] == "cuda"
    row: dict[str, Any] = {k: spec[k] for k in ("model", "mode", "teacher", "batch_size", "precision")}
    with tempfile.TemporaryDirectory() as d:
        if cuda:
            torch.cuda.init()
            torch.cuda.reset_peak_memory_stats()
        rss0 = _peak_rss_bytes()
        try:
            res = train(cfg, Path(d))
        except torch.cuda.OutOfMemoryError as e:
            row["error"] = f"out of memory ({str(e).splitlines()[0][:80]})"
            return row
        if cuda:
            row["peak_mem_bytes"] = int(torch.cuda.max_memory_allocated())
            row["peak_mem_kind"] = "cuda max_memory_allocated"
        else:
            row["peak_mem_bytes"] = _peak_rss_bytes() - rss0
            row["peak_mem_kind"] = "peak RSS growth"
        lines = [json.loads(line) for line in (Path(d) / "metrics.jsonl").read_text().splitlines()]
    ips = [line["train/images_per_s"] for line in lines if line.get("kind") == "train"]
    if res["steps"] != spec["steps"] or len(ips) != spec["steps"]:
        raise RuntimeError(f"expected {spec['steps']} logged steps, got {res['steps']} steps and {len(ips)} logs")
    times = [spec["batch_size"] / v for v in ips[spec["warmup"]:]]
    if not times:
        raise ValueError(f"--steps {spec['steps']} leaves no step after --warmup {spec['warmup']}")
    med = statistics.median(times)
    row.update(steps_timed=len(times), s_per_step=med, images_per_s=spec["batch_size"] / med,
               s_per_step_min=min(times), s_per_step_max=max(times))
    # parameter counts (after the run: building the models must not count towards its memory)
    from kdrun.models.build import build_model

    from kdrun.commands.evaluate import count_params

    row["params"] = count_params(build_model(cfg.student))
    if spec["mode"] != "plain":
        row["teacher_params"] = count_params(build_model(cfg.teacher))
    return row


def run_isolated(spec: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """:func:`run_one` in a fresh Python process; its result is the last ``BENCH_RESULT`` line."""
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                         capture_output=True, text=True, timeout=timeout)
    row = parse_result(out.stdout)
    if out.returncode != 0 or row is None:
        tail = "\n".join((out.stderr or out.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"the benchmark of {spec['model']}/{spec['mode']} failed (exit {out.returncode}):\n{tail}")
    return row


def merge_rounds(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One row from its runs in several rounds: the median over rounds of the per-run median step time
    (the first run's other figures; the largest peak memory); a failed run fails the row."""
    bad = [r for r in rows if "error" in r]
    if bad:
        return bad[0]
    out = dict(rows[0])
    out["s_per_step"] = statistics.median(r["s_per_step"] for r in rows)
    out["images_per_s"] = out["batch_size"] / out["s_per_step"]
    out["s_per_step_rounds"] = [r["s_per_step"] for r in rows]
    if all("peak_mem_bytes" in r for r in rows):
        out["peak_mem_bytes"] = max(r["peak_mem_bytes"] for r in rows)
    return out


def parse_result(stdout: str) -> dict[str, Any] | None:
    rows = [line[len(RESULT):] for line in stdout.splitlines() if line.startswith(RESULT)]
    return json.loads(rows[-1]) if rows else None


def loader_rate(spec: dict[str, Any], batches: int) -> float:
    """Images/s of the training data loader alone (same data, batch, workers; first batch excluded)."""
    import torch
    from torch.utils.data import DataLoader

    from kdrun.data.coco import build_synthetic
    from kdrun.runtime.distributed import TrainSampler

    size = int(spec["image_size"])
    dm = build_synthetic(root=spec["data_root"], train_size=spec["batch_size"] * spec["steps"], val_size=1,
                         image_size=size, eval_size=size, scales=[size], max_size=input_size(size)[1], augment=False)
    loader = DataLoader(dm.train, batch_size=spec["batch_size"], sampler=TrainSampler(len(dm.train), 0),
                        num_workers=spec["workers"], collate_fn=dm.collate_fn, drop_last=True,
                        pin_memory=spec["device"] == "cuda" and torch.cuda.is_available())
    n, t0 = 0, 0.0
    for i, (images, _) in enumerate(loader):
        if i == 0:
            t0 = time.perf_counter()
        else:
            n += len(images)
        if i >= batches:
            break
    return n / max(time.perf_counter() - t0, 1e-9) if n else float("nan")


def machine(device: str, threads: int | None) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, {threads or torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}")


def _mem(row: dict[str, Any]) -> str:
    b = row.get("peak_mem_bytes")
    return "—" if b is None else f"{b / 2**30:.2f} GiB"


def format_table(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The markdown section: heading with machine and date, the exact command, settings, the table."""
    h, w = input_size(meta["image_size"])
    out = [f"### ViDT training step — {meta['date']}, {meta['machine']}", "",
           f"`{meta['command']}`", "",
           f"batch {meta['batch_size']}, inputs {h}×{w} (synthetic COCO-format JPEGs, no augmentation), "
           f"{meta['precision']}, {meta['det_tokens']} [DET] tokens, {meta['dec_layers']} decoder layers, "
           f"{meta['num_classes']} classes, AdamW, clip 0.1"
           + (" (fp32 on CUDA: TF32 matmuls and convolutions, the engine's setting)"
              if meta["device"] == "cuda" and meta["precision"] == "fp32" else "")
           + f"; distillation from a frozen "
           f"ViDT-{meta['teacher']} (inference_mode), fixed weights. Median of {meta['steps'] - meta['warmup']} "
           f"steps after {meta['warmup']} warm-up, each row in a fresh process"
           + (f", median over {meta['rounds']} interleaved rounds" if meta.get("rounds", 1) > 1 else "")
           + "; data loader alone "
           f"({meta['workers']} workers): {meta['loader_images_per_s']:.1f} images/s. Peak memory: "
           + ("`torch.cuda.max_memory_allocated()` over the run." if meta["device"] == "cuda" else
              "growth of the process's peak RSS (`getrusage` `ru_maxrss`) over the run."), ""]
    if meta["steps"] - meta["warmup"] < 10:
        out += [f"(smoke run: only {meta['steps'] - meta['warmup']} timed steps)", ""]
    out += ["| student | params | distillation | ms/step | images/s | × no-KD time | peak memory |",
            "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    plain = {r["model"]: r for r in rows if r["mode"] == "plain" and "error" not in r}
    for r in rows:
        kd = "—" if r["mode"] == "plain" else f"{MODE_LABEL[r['mode']]} ← ViDT-{r['teacher']}" + (
            f" ({r['teacher_params'] / 1e6:.1f} M)" if "teacher_params" in r else "")
        params = f"{r['params'] / 1e6:.1f} M" if "params" in r else "—"
        if "error" in r:
            out.append(f"| ViDT-{r['model']} | {params} | {kd} | {r['error']} | | | |")
            continue
        ratio = (f"{r['s_per_step'] / plain[r['model']]['s_per_step']:.2f}"
                 if r["mode"] != "plain" and r["model"] in plain else "—")
        out.append(f"| ViDT-{r['model']} | {params} | {kd} | {1000 * r['s_per_step']:.1f} | "
                   f"{r['images_per_s']:.2f} | {ratio} | {_mem(r)} |")
    return "\n".join(out)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--image-size", type=int, default=None,
                   help="shorter input side; the longer is ·1333/800 (default 128 on cpu, 800 on cuda)")
    p.add_argument("--batch-size", type=int, default=2, help="per step (ViDT: 2 per GPU)")
    p.add_argument("--models", nargs="+", choices=MODELS, default=["nano", "tiny", "small"])
    p.add_argument("--base", action="store_true", help="add the ViDT-base student")
    p.add_argument("--modes", nargs="+", choices=MODES, default=["plain", "distill"],
                   help="rows per student (default: plain distill; see the module docstring)")
    p.add_argument("--teacher", choices=TEACHERS, default="base", help="the frozen teacher (conf/teacher/vidt_*)")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--workers", type=int, default=None, help="data loader workers (default 0 on cpu, 4 on cuda)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--det-tokens", type=int, default=100)
    p.add_argument("--dec-layers", type=int, default=6)
    p.add_argument("--num-classes", type=int, default=91)
    p.add_argument("--rounds", type=int, default=1,
                   help="run every row this many times, interleaved (round 1: all rows, round 2: all rows, ...), "
                        "and report the median over rounds of each row's median step: on a shared machine the "
                        "load drifts, and interleaving spreads the drift over the rows")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the rows and settings as JSON")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child is None:
        if a.steps - a.warmup < 1 or a.warmup < 0 or a.batch_size < 1 or a.rounds < 1:
            p.error("need --warmup >= 0, --batch-size >= 1, --rounds >= 1 and at least one step after the warm-up")
        a.image_size = a.image_size or (800 if a.device == "cuda" else 128)
        a.workers = a.workers if a.workers is not None else (4 if a.device == "cuda" else 0)
        if a.base and "base" not in a.models:
            a.models = [*a.models, "base"]
    return a


def main(argv: Sequence[str] | None = None) -> str:
    a = parse_args(argv)
    if a.child is not None:
        print(RESULT + json.dumps(run_one(json.loads(a.child))), flush=True)
        return ""
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("bench_detection: --device cuda but no CUDA device is visible")
    base = dict(device=a.device, precision=a.precision, image_size=a.image_size, batch_size=a.batch_size,
                teacher=a.teacher, steps=a.steps, warmup=a.warmup, workers=a.workers, threads=a.threads,
                det_tokens=a.det_tokens, dec_layers=a.dec_layers, num_classes=a.num_classes)
    tmp = Path(tempfile.mkdtemp(prefix="kdrun-bench-det-"))
    try:
        h, w = input_size(a.image_size)
        base["data_root"] = str(make_fixed_size_set(tmp / "data", a.batch_size * a.steps, 1, h, w))
        meta = dict(base, date=time.strftime("%Y-%m-%d"), machine=machine(a.device, a.threads),
                    command="python scripts/bench_detection.py " + " ".join(sys.argv[1:] if argv is None else argv),
                    loader_images_per_s=loader_rate(base, a.steps - 1))
        print(f"inputs {h}×{w}, batch {a.batch_size}, {a.precision}, {a.device}; loader alone "
              f"{meta['loader_images_per_s']:.1f} images/s", file=sys.stderr, flush=True)
        runs: dict[tuple[str, str], list[dict[str, Any]]] = {(m, o): [] for m in a.models for o in a.modes}
        for rnd in range(a.rounds):
            for model, mode in runs:
                try:
                    row = run_isolated(dict(base, model=model, mode=mode))
                except RuntimeError as e:  # reported in its row; the other rows still run
                    print(e, file=sys.stderr, flush=True)
                    row = dict(model=model, mode=mode, teacher=a.teacher, error="failed (see the log)")
                runs[(model, mode)].append(row)
                msg = row.get("error") or (f"{1000 * row['s_per_step']:8.1f} ms/step {row['images_per_s']:8.2f} "
                                           f"images/s  {_mem(row)}")
                print(f"[round {rnd + 1}/{a.rounds}] ViDT-{model:5s} {mode:14s} {msg}", file=sys.stderr, flush=True)
        rows = [merge_rounds(rs) for rs in runs.values()]
        meta["rounds"] = a.rounds
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    table = format_table(rows, meta)
    print(table, flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return table


if __name__ == "__main__":
    main()
