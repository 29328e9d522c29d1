"""Shared settings for the DDP tests: configs, subprocess helpers, and one 2-process reference launch.

Starting processes dominates the cost of these tests (each imports torch), so every 2-process run
that needs no CLI (the equivalence runs of five balancers and the fault-tolerance reference) shares
one launch through :func:`kdrun.commands.launch.spawn`, made once per session.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

import kdrun.runtime.checkpoint as ckpt
from tests.conftest import compose_cfg

ROOT = Path(__file__).resolve().parents[2]

# A random (checkpoint-free) small teacher: what it knows does not matter for exactness checks, and
# every rank builds it from the same seed.
TEACHER = ["teacher=convnet_l", "teacher.checkpoint=null", "teacher.allow_random=true",
           "teacher.model.widths=[8,16,32]", "teacher.model.convs_per_stage=1", "distill=kl"]
COMMON = ["trainer.accelerator=cpu", "trainer.deterministic=true", "logger.progress=false",
          "logger.backends=[]", "scheduler=cosine", "scheduler.warmup_epochs=0", *TEACHER]

# Equivalence: a BatchNorm-free student, no augmentation, 8 steps; π logged at every step and the
# gradient diagnostics on every 3rd (their Jacobian is shared with gradient-level balancers).
EQ_STEPS = 8
EQ_BATCH = 32  # per process; the single-process run uses 2 × EQ_BATCH
EQUIV = [*COMMON, "+student.model.norm=none", "dataset.augment=false", "trainer.epochs=1",
         f"trainer.max_steps={EQ_STEPS}", "logger.log_every=1", "logger.grad_stats_every=3",
         "trainer.save_best=false"]
BALANCERS = ["fixed", "dto", "dto_exact", "cross_batch", "mgda", "dot"]
# What a balancer needs beside it: DOT keeps the momentum, so a plain SGD (kdrun/balancers/dot.py check_run).
WITH = {"dot": ["optimizer=sgd_plain"]}

# The student's EMA under DDP (test_ema_ddp.py): the fixed-balancer equivalence run with one.
EQ_EMA = "trainer.ema={decay:0.8,warmup:true}"

# Fault tolerance: the default (BatchNorm) student with augmentation, so resuming must restore every
# rank's own random stream; 2 epochs of 11 steps at 64 per process; last.pt every 4 steps.
FT_BATCH = 64
FT = [*COMMON, "trainer.epochs=2", f"trainer.batch_size={FT_BATCH}", "trainer.save_every_steps=4",
      "logger.log_every=5", "logger.grad_stats_every=0", "seed=5"]
FT_STEPS_PER_EPOCH = 1438 // 2 // FT_BATCH  # digits: 1438 training images, 2 processes


def pause(at: int, marker: Path, mode: str = "hang", **extra: Any) -> list[str]:
    """Overrides adding the PauseAt term (it has no effect on the numbers, fired or not)."""
    out = ["+distill.pause._target_=tests.distributed.helpers.PauseAt", f"+distill.pause.at={at}",
           f"+distill.pause.marker={marker}", f"+distill.pause.mode={mode}"]
    return out + [f"+distill.pause.{k}={v}" for k, v in extra.items()]


def resolved_yaml(overrides: list[str]) -> str:
    return OmegaConf.to_yaml(compose_cfg(overrides), resolve=True)


def env() -> dict[str, str]:
    """Subprocess environment: the repo importable (test loss terms), one thread per process (the
    2-process runs must be bit-comparable however they were started)."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    e["OMP_NUM_THREADS"] = "1"
    e.pop("HYDRA_FULL_ERROR", None)
    return e


def kdrun_train(args: list[str], cwd: Path | None = None, extra_env: dict[str, str] | None = None,
                **kw: Any) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kdrun.cli", "train", *args], cwd=cwd or ROOT,
                            env={**env(), **(extra_env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def finish(p: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    out, _ = p.communicate(timeout=timeout)
    return p.returncode, out


def wait_for(path: Path, procs: list[subprocess.Popen], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            raise AssertionError(f"a process ended before {path.name} appeared:\n{dead[0].communicate()[0][-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trainable(path: Path) -> dict[str, torch.Tensor]:
    return ckpt.load(path)["trainable"]


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"not bit-identical: {diff[:5]}"


@pytest.fixture(scope="session")
def two_proc(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Run dirs of the 2-process reference runs: ``eq/<balancer>``, ``ft_reference`` and ``eq_ema``."""
    from kdrun.commands.launch import spawn
    from tests.distributed.helpers import run_jobs

    root = tmp_path_factory.mktemp("two_proc")
    dirs = {f"eq/{b}": root / "eq" / b for b in BALANCERS}
    dirs["ft_reference"] = root / "ft_reference"
    jobs = [(resolved_yaml([*EQUIV, f"balancer={b}", *WITH.get(b, []), f"trainer.batch_size={EQ_BATCH}"]),
             str(dirs[f"eq/{b}"]))
            for b in BALANCERS]
    jobs.append((resolved_yaml([*FT, *pause(-1, root / "never")]), str(dirs["ft_reference"])))
    dirs["eq_ema"] = root / "eq_ema"
    jobs.append((resolved_yaml([*EQUIV, "balancer=fixed", EQ_EMA, f"trainer.batch_size={EQ_BATCH}"]),
                 str(dirs["eq_ema"])))
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the workers, as in the CLI runs
    try:
        ranks = spawn(run_jobs, (jobs,), 2, grace_s=10)
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    assert sorted(ranks.values()) == [0, 1]
    return dirs


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """In-process runs here use one intra-op thread, like every worker: on a shared, busy machine
    two spinning OpenMP threads per process make a tiny model 10-30× slower, and the 1-process
    references should run the same kernels as the 2-process runs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
