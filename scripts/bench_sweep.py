#!/usr/bin/env python
"""What a balancer sweep costs with ``hydra/launcher=kdrun_shared`` against Hydra's basic launcher (issue #26).

For each model pair and K in ``--ks`` the same K-job sweep, ``kdrun train -m ... balancer.alpha_distill=v1,..,vK``
(K students of equal cost that differ only in their distillation weight, so they form one group), runs with
both launchers, interleaved: every round runs every (K, launcher) once, the launcher order alternating from
round to round, so that a change in the machine's load hits both. Each sweep runs in a child process of its
own (``--child``) that imports kdrun first and then times the whole sweep as ``kdrun train`` runs it (Hydra,
every job's build, steps, validation, checkpoints and results); the parent reads back its wall time and its
peak resident memory (``ru_maxrss``: the one process holds all K students under kdrun_shared, one at a time
under basic). Reported: the median wall time per (K, launcher) over the rounds, the ratio basic ÷ shared
(the speed-up), and the bound on it for the measured share s of the data pipeline and teacher forward in
one job's step: 1 / ((1 − s) + s/K), Amdahl's law with the shared part done once instead of K times.

s is measured on one job built by the engine's own functions (``build``, ``make_step``): per step, the time
of fetching the batch and :meth:`KDStep.prepare` (to the device, mixup, teacher forward) against the time
of :meth:`KDStep.learn` (the student's forward, objectives, balancer, backward, update), medians over
``--share-steps`` steps after warm-up.

    python scripts/bench_sweep.py                                  # both pairs, K = 1, 2, 4, 8
    python scripts/bench_sweep.py --pairs cifar --ks 1 4 --rounds 3 --steps 20

Not a test: timings depend on the machine and on whatever else runs on it (the load average is printed).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PAIRS = {
    # CIFAR-zoo pair: resnet56 → resnet20, KD logits (CIFAR protocol batch 64), random teacher weights.
    "cifar": ["teacher=resnet56", "teacher.allow_random=true", "student=resnet20", "distill=kl",
              "dataset.num_classes=100", "dataset.in_chans=3"],
    # DeiT-Ti ← RegNetY-160 (the papers' ImageNet pair), as scripts/bench_balancers.py runs it on the CPU:
    # distillation-token KD + VkD feature matching through the orthogonal projector (thin-QR chart).
    "deit": ["teacher=timm", "teacher.allow_random=true", "teacher.model.model_name=regnety_160", "student=timm",
             "student.model.model_name=deit_tiny_distilled_patch16_224", "distill=[kl,smooth_l1]",
             "distill.kl.student_logits=dist_logits", "distill.smooth_l1.student_tap=patch_mean",
             "projector=orthogonal", "projector.orthogonal_map=qr", "dataset.num_classes=1000", "dataset.in_chans=3"],
}
SIZES = {"cifar": (32, 64), "deit": (64, 16)}  # (image size, batch): a CPU step of a few hundred ms


def job_overrides(pair: str, steps: int) -> list[str]:
    """One job of the sweep: the pair on synthetic data, one epoch of ``steps`` steps, a small val split."""
    size, batch = SIZES[pair]
    out = ["dataset=synthetic", f"dataset.image_size={size}", f"dataset.train_size={batch * steps}",
           "dataset.val_size=32", f"trainer.batch_size={batch}", "trainer.accelerator=cpu", "trainer.epochs=1",
           "optimizer=sgd", "scheduler=constant", "balancer=fixed", "logger.progress=false", *PAIRS[pair]]
    return out + ([f"+student.model.img_size={size}"] if pair == "deit" else [])


def sweep_argv(pair: str, k: int, launcher: str, steps: int, out: Path) -> list[str]:
    weights = ",".join(f"{(i + 1) / (k + 1):.4f}" for i in range(k))  # K distinct distillation weights
    return ["train", "-m", *job_overrides(pair, steps), f"balancer.alpha_distill={weights}",
            f"hydra/launcher={launcher}", f"hydra.sweep.dir={out}"]


def child(argv: list[str], report: str) -> None:
    """``--child``: run one sweep in this process and write its wall time and peak memory to ``report``."""
    import resource

    from kdrun import cli

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    try:
        cli.main(argv)
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    Path(report).write_text(json.dumps({"wall_s": wall, "peak_kib": peak, "base_kib": base}))


def run_sweep(pair: str, k: int, launcher: str, steps: int, tmp: Path, tag: str, env: dict[str, str]) -> dict[str, float]:
    out, report = tmp / f"{tag}_{pair}_k{k}_{launcher}", tmp / f"{tag}_{pair}_k{k}_{launcher}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(report), "--",
           *sweep_argv(pair, k, launcher, steps, out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if done.returncode != 0 or not report.is_file():
        raise SystemExit(f"{shlex.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    jobs = sorted(p for p in out.iterdir() if (p / "results.json").is_file())
    assert len(jobs) == k, (out, jobs)
    return json.loads(report.read_text())


def measure_share(pair: str, steps: int, warmup: int) -> dict[str, float]:
    """s: the share of the data pipeline and the teacher forward in one job's step (module docstring)."""
    from kdrun.compose import compose_train_config
    from kdrun.config import validate
    from kdrun.engine.build import build
    from kdrun.engine.environment import pick_device, set_backend_flags
    from kdrun.engine.run import make_step
    from kdrun.runtime.checkpoint import TrainState

    cfg = compose_train_config([*job_overrides(pair, steps + warmup), "balancer.alpha_distill=0.5"])
    settings = validate(cfg)
    device = pick_device(settings.trainer.accelerator)
    set_backend_flags(settings.trainer, device)
    parts = build(cfg, settings.trainer, device, settings.seed)
    step = make_step(parts, cfg, TrainState())
    data, learn = [], []
    batches = iter(parts.loaders.train)
    for i in range(steps + warmup):
        t0 = time.perf_counter()
        prepared = step.prepare(next(batches))
        t1 = time.perf_counter()
        step.learn(prepared, i)
        t2 = time.perf_counter()
        if i >= warmup:
            data.append(t1 - t0)
            learn.append(t2 - t1)
    d, s_ = statistics.median(data), statistics.median(learn)
    return {"data_teacher_ms": 1000 * d, "student_ms": 1000 * s_, "share": d / (d + s_)}


def report(args: argparse.Namespace, times: dict, mem: dict, shares: dict) -> None:
    import torch

    load = os.getloadavg()
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; {time.strftime('%Y-%m-%d %H:%M %Z')}; load "
          f"average after the runs {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    print(f"command: `python scripts/bench_sweep.py {shlex.join(sys.argv[1:])}`".rstrip())
    for pair in args.pairs:
        sh = shares[pair]
        size, batch = SIZES[pair]
        print(f"\n{pair} pair, {size}×{size}, batch {batch}, {args.steps} steps per job; one job's step: data + "
              f"teacher {sh['data_teacher_ms']:.1f} ms, student {sh['student_ms']:.1f} ms, s = {sh['share']:.2f}\n")
        print("| K | basic (s) | kdrun_shared (s) | speed-up (basic ÷ shared) | bound 1/((1−s)+s/K) | rounds "
              "(basic / shared, s) | peak RSS basic | peak RSS shared |")
        print("| ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |")
        for k in args.ks:
            b, s = times[(pair, k, "basic")], times[(pair, k, "kdrun_shared")]
            mb, ms = statistics.median(b), statistics.median(s)
            bound = 1 / ((1 - sh["share"]) + sh["share"] / k)
            rounds = ", ".join(f"{x:.1f} / {y:.1f}" for x, y in zip(b, s))
            gib = [max(mem[(pair, k, launcher)]) / 2**20 for launcher in ("basic", "kdrun_shared")]
            print(f"| {k} | {mb:.1f} | {ms:.1f} | {mb / ms:.2f}× | {bound:.2f}× | {rounds} | {gib[0]:.2f} GiB | "
                  f"{gib[1]:.2f} GiB |")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[4:], sys.argv[2])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", nargs="+", choices=sorted(PAIRS), default=["cifar", "deit"])
    p.add_argument("--ks", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--steps", type=int, default=12, help="training steps per job (one epoch)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (median over them)")
    p.add_argument("--share-steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=0,
                   help="intra-op threads of every sweep (OMP_NUM_THREADS; 0: torch's default). On a machine that "
                        "other jobs keep busy, 1 avoids OpenMP threads spin-waiting for each other's cores")
    args = p.parse_args()
    env = dict(os.environ)
    if args.threads:
        import torch

        env["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    shares = {pair: measure_share(pair, args.share_steps, 3) for pair in args.pairs}
    for pair, sh in shares.items():
        print(f"{pair}: s = {sh['share']:.3f} ({sh['data_teacher_ms']:.1f} / {sh['student_ms']:.1f} ms)",
              file=sys.stderr, flush=True)
    times: dict[tuple, list[float]] = {}
    mem: dict[tuple, list[int]] = {}
    with tempfile.TemporaryDirectory(prefix="kdrun-bench-sweep-") as tmp:
        for r in range(args.rounds):
            for pair in args.pairs:
                for k in args.ks:
                    order = ("basic", "kdrun_shared") if (r + k) % 2 == 0 else ("kdrun_shared", "basic")
                    for launcher in order:
                        got = run_sweep(pair, k, launcher, args.steps, Path(tmp), f"r{r}", env)
                        times.setdefault((pair, k, launcher), []).append(got["wall_s"])
                        mem.setdefault((pair, k, launcher), []).append(got["peak_kib"])
                        print(f"round {r + 1} {pair} K={k} {launcher:12s} {got['wall_s']:7.1f} s "
                              f"{got['peak_kib'] / 2**20:.2f} GiB", file=sys.stderr, flush=True)
    report(args, times, mem, shares)


if __name__ == "__main__":
    main()
