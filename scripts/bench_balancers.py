#!/usr/bin/env python
"""Per-step time of every balancer relative to ``fixed``, through the real engine, on synthetic data.

For each (model pair, balancer) the engine runs ``--steps`` optimiser steps with logging on every
step and gradient diagnostics off (they are optional and would be charged to every balancer alike);
the per-step wall time is read back from ``metrics.jsonl`` (``batch / train/images_per_s``, which the
engine measures between consecutive steps, after its per-step host sync, so GPU time is included).
The median over the steps after ``--warmup`` is reported, with the ratio to ``fixed`` measured in the
same process; ``fixed`` is run first and last, and the table reports both to show drift. With
``--rounds R`` the whole list is run R times in turn (so slow drifts of a shared machine spread over
every balancer), each row is the median over all its rounds' steps, and the ratios are taken to the
median of every ``fixed`` step (first and last rows, all rounds).

    python scripts/bench_balancers.py --pair cifar --steps 30 --warmup 5
    python scripts/bench_balancers.py --pair deit --device cuda --precision bf16 --image-size 224
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from kdrun.cli import config_dir
from kdrun.engine import train

PAIRS = {
    # CIFAR-zoo pair: resnet56 → resnet20, KD logits (CIFAR protocol batch 64).
    "cifar": ["teacher=resnet56", "teacher.allow_random=true", "student=resnet20", "distill=kl", "dataset.num_classes=100",
              "dataset.in_chans=3"],
    # DeiT-Ti ← RegNetY-160 (the papers' ImageNet pair): distillation-token KD + VkD feature matching.
    "deit": ["teacher=timm", "teacher.allow_random=true", "teacher.model.model_name=regnety_160", "student=timm",
             "student.model.model_name=deit_tiny_distilled_patch16_224", "distill=[kl,smooth_l1]",
             "distill.kl.student_logits=dist_logits", "distill.smooth_l1.student_tap=patch_mean",
             "projector=orthogonal", "projector.orthogonal_map=qr", "dataset.num_classes=1000", "dataset.in_chans=3"],
}

BALANCERS = [
    ("fixed", []),
    ("dto (amortised, lagged)", ["balancer=dto", "balancer.next_loss=lagged"]),
    ("dto (amortised, same_batch)", ["balancer=dto"]),
    ("dto_exact (params)", ["balancer=dto_exact"]),
    ("dto_exact (params, loop jacobian)", ["balancer=dto_exact", "trainer.jacobian=loop"]),
    ("dto_exact (features)", ["balancer=dto_exact", "trainer.grad_space=features"]),
    ("famo", ["balancer=famo"]),
    ("cross_batch", ["balancer=cross_batch"]),
    ("mgda", ["balancer=mgda"]),
    ("pcgrad", ["balancer=pcgrad"]),
    ("upgrad", ["balancer=upgrad"]),
    ("cagrad", ["balancer=cagrad"]),
    ("fairgrad", ["balancer=fairgrad"]),
    ("imtl", ["balancer=imtl"]),
    ("nash_mtl", ["balancer=nash_mtl"]),
    ("uncertainty", ["balancer=uncertainty"]),
    ("gradnorm", ["balancer=gradnorm"]),
    ("dwa", ["balancer=dwa"]),
    ("distill_decay", ["balancer=distill_decay"]),
    ("fixed (again)", []),
]


def step_times(overrides: list[str], steps: int, warmup: int) -> list[float]:
    with tempfile.TemporaryDirectory() as d:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides + [
                f"trainer.max_steps={steps}", "trainer.epochs=1000", "trainer.save_last=false",
                "trainer.save_best=false", "logger.log_every=1", "logger.grad_stats_every=0",
                "logger.progress=false", "logger.backends=[]"])
        res = train(cfg, Path(d))
        lines = [json.loads(l) for l in (Path(d) / "metrics.jsonl").read_text().splitlines()]
    batch = cfg.trainer.batch_size
    ips = [l["train/images_per_s"] for l in lines if l["kind"] == "train"]
    assert res["steps"] == steps and len(ips) == steps, (res["steps"], len(ips))
    return [batch / v for v in ips[warmup:]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pair", choices=sorted(PAIRS), default="cifar")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--only", nargs="*", default=None, help="run only these balancer labels")
    p.add_argument("--rounds", type=int, default=1, help="run the whole list this many times in turn")
    a = p.parse_args()
    size = a.image_size or (32 if a.pair == "cifar" else 64)
    batch = a.batch_size or (64 if a.pair == "cifar" else 16)
    common = ["dataset=synthetic", f"dataset.image_size={size}", f"dataset.train_size={batch * (a.steps + 2)}",
              "dataset.val_size=16", f"trainer.batch_size={batch}", f"trainer.accelerator={a.device}",
              f"trainer.precision={a.precision}", "optimizer=sgd", "scheduler=constant", *PAIRS[a.pair]]
    if a.pair == "deit":
        common.append(f"+student.model.img_size={size}")
    chosen = [(label, over) for label, over in BALANCERS
              if not a.only or label in a.only or label.startswith("fixed")]
    times: dict[str, list[float]] = {label: [] for label, _ in chosen}
    for r in range(a.rounds):
        for label, over in chosen:
            times[label] += step_times(common + over, a.steps, a.warmup)
            print(f"round {r + 1}/{a.rounds} {label:36s} {1000 * statistics.median(times[label]):9.1f} ms/step",
                  flush=True)
    base = statistics.median(times["fixed"] + times["fixed (again)"])
    rows = [(label, statistics.median(ts), statistics.median(ts) / base) for label, ts in times.items()]
    dev = torch.cuda.get_device_name() if a.device == "cuda" else f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"
    print(f"\n### {a.pair} pair — {time.strftime('%Y-%m-%d')}, {dev}, torch {torch.__version__}")
    print(f"`python scripts/bench_balancers.py {shlex.join(sys.argv[1:])}` — batch {batch}, {size}×{size}, "
          f"{a.precision}, median of {a.steps - a.warmup} steps after {a.warmup} warm-up × {a.rounds} round(s); "
          "× fixed = against the median of all `fixed` steps\n")
    print("| balancer | ms/step | × fixed |\n| --- | ---: | ---: |")
    for label, t, r in rows:
        print(f"| {label} | {1000 * t:.1f} | {r:.2f} |")


if __name__ == "__main__":
    main()
