#!/usr/bin/env python
"""CPU scaling of kdrun's DDP path: 1 vs N gloo processes on one machine (images/s).

Every configuration runs the real command, ``kdrun train ... trainer.accelerator=cpu trainer.devices=N``
(N = 1 is a plain process), with the same per-process batch (weak scaling: the global batch grows with
N) and T intra-op threads per process (OMP_NUM_THREADS). A configuration is written ``NxT``; the
default compares one process with one thread, one process with all cores, and N processes sharing
the cores. The throughput of a step is what the engine logs as ``train/images_per_s`` (global images
per second between two log steps, logged every step here); the table reports the median over the
steps after the warm-up, and the speed-up over the first configuration.

    python scripts/bench_scaling.py                        # digits, KD from a small random teacher
    python scripts/bench_scaling.py --dataset synthetic --configs 1x1,2x1,4x1 --steps 60

Not a test: timings depend on the machine and on whatever else runs on it (the load average is
printed with the table).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MODEL = ["teacher=convnet_l", "teacher.checkpoint=null", "teacher.allow_random=true", "distill=kl", "logger.progress=false",
         "logger.backends=[]", "logger.log_every=1", "logger.grad_stats_every=0",
         "trainer.save_last=false", "trainer.save_best=false", "trainer.val_every=1000"]


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(nproc: int, threads: int, args: argparse.Namespace, out: Path) -> list[float]:
    """One configuration; the per-step global images/s after the warm-up."""
    run_dir = out / f"p{nproc}"
    cmd = [sys.executable, "-m", "kdrun.cli", "train", f"dataset={args.dataset}", *MODEL,
           "trainer.accelerator=cpu", f"trainer.devices={nproc}", f"trainer.batch_size={args.batch}",
           "trainer.epochs=1000", f"trainer.max_steps={args.warmup + args.steps}", f"hydra.run.dir={run_dir}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["train/images_per_s"] for r in rows if r.get("kind") == "train" and "train/images_per_s" in r]
    return rates[args.warmup:]


def stop_check_worker(calls: int) -> float:
    """In each of 2 processes: the median time of one stop-flag agreement (kdrun.runtime.preemption's
    all-reduce of 8 bytes on the CPU), in microseconds."""
    import time

    from kdrun.runtime import distributed as D
    D.init_process_group("cpu")
    try:
        for _ in range(50):  # warm-up
            D.all_reduce_max_int(0)
        per_call = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(calls):
                D.all_reduce_max_int(0)
            per_call.append((time.perf_counter() - t) / calls)
        return statistics.median(per_call) * 1e6
    finally:
        D.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="digits", choices=["digits", "synthetic"])
    p.add_argument("--configs", default=f"1x1,1x{cores()},2x{max(1, cores() // 2)}",
                   help="comma-separated PROCESSESxTHREADS (default: %(default)s)")
    p.add_argument("--batch", type=int, default=64, help="per process")
    p.add_argument("--steps", type=int, default=30, help="measured steps (median over them)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=1, help="runs per configuration (median of medians)")
    p.add_argument("--stop-check", action="store_true",
                   help="also time the per-step stop-flag all-reduce between 2 processes")
    args = p.parse_args()
    configs: list[tuple[int, int]] = []
    for c in dict.fromkeys(args.configs.split(",")):
        n, th = c.split("x")
        configs.append((int(n), int(th)))
    results: dict[tuple[int, int], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="kdrun-bench-") as tmp:
        for i in range(args.repeats):  # interleaved, so that a change in the machine's load hits all
            for n, th in configs:
                r = statistics.median(run(n, th, args, Path(tmp) / f"r{i}_{n}x{th}"))
                results.setdefault((n, th), []).append(r)
                print(f"  {n} process(es) x {th} thread(s), run {i + 1}: {r:.0f} images/s", file=sys.stderr,
                      flush=True)
    med = {c: statistics.median(v) for c, v in results.items()}
    import torch

    base = med[configs[0]]
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"machine: {cpu_name()}, {cores()} cores, {platform.system()} {platform.release()}, "
          f"torch {torch.__version__}, Python {platform.python_version()}")
    print(f"date: {datetime.date.today().isoformat()}, load average after the runs: "
          f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    print(f"command: python scripts/bench_scaling.py {shlex.join(sys.argv[1:])}".rstrip())
    print()
    print(f"| processes | threads each | batch per process | global batch | images/s (median of "
          f"{args.steps} steps{f', median of {args.repeats} runs' if args.repeats > 1 else ''}) | "
          "runs | speed-up |")
    print("| ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    for n, th in configs:
        runs = ", ".join(f"{v:.0f}" for v in results[(n, th)])
        print(f"| {n} | {th} | {args.batch} | {args.batch * n} | {med[(n, th)]:.0f} | {runs} | "
              f"{med[(n, th)] / base:.2f}× |")
    if args.stop_check:
        from kdrun.commands.launch import spawn

        os.environ.setdefault("OMP_NUM_THREADS", "1")
        us = spawn(stop_check_worker, (500,), 2)
        print(f"\nstop-flag agreement (8-byte gloo all-reduce, 2 processes): median {us[0]:.0f} µs per step "
              f"(rank 0), {us[1]:.0f} µs (rank 1)")


if __name__ == "__main__":
    main()
