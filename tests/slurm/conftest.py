"""The one-node Slurm of scripts/slurm_local.sh, for the `slurm`-marked tests (tests/slurm/test_cluster.py).

The cluster is brought up outside pytest (`scripts/slurm_local.sh up`, as .ci/run does); these tests only
use it. Without it the tests skip with the reason; with KDRUN_REQUIRE_SLURM=1 (CI's slurm phase) they fail
instead, so a cluster that did not come up cannot pass as skipped tests.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SLURM_DIR = Path(os.environ.get("KDRUN_SLURM_DIR") or Path(os.environ.get("TMPDIR", "/tmp")) / "kdrun-slurm")


def _unavailable() -> str | None:
    """Why the tests cannot run here, or None."""
    conf = SLURM_DIR / "slurm.conf"
    if not conf.is_file():
        return f"no one-node Slurm is up ({conf} does not exist; run scripts/slurm_local.sh up)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], env={**os.environ, "SLURM_CONF": str(conf)},
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"sinfo failed ({e})"
    if out.returncode != 0 or not out.stdout.strip():
        return f"the Slurm of {conf} does not answer: {out.stderr.strip() or 'no nodes'}"
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
    except ImportError:
        return 'the slurm extra is not installed (pip install -e ".[slurm]")'
    return None


@pytest.fixture(scope="session")
def slurm() -> dict[str, str]:
    """The environment that submits to the local cluster: its SLURM_CONF, and this Python's environment
    first on PATH (sbatch passes the submitting environment on to the job, which is how the README's
    script finds `kdrun` and submitit's jobs find this Python), the repository importable (test loss
    terms)."""
    why = _unavailable()
    if why is not None:
        if os.environ.get("KDRUN_REQUIRE_SLURM") == "1":
            pytest.fail(f"KDRUN_REQUIRE_SLURM=1 but {why}")
        pytest.skip(why)
    env = dict(os.environ)
    env["SLURM_CONF"] = str(SLURM_DIR / "slurm.conf")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("HYDRA_FULL_ERROR", None)
    for k in [k for k in env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
        env.pop(k)  # pytest itself inside a Slurm job: its job's variables must not leak into ours
    return env


def run_cmd(args: list[str], env: dict[str, str], timeout: float, **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, **kw)


def job_state(job_id: str, env: dict[str, str]) -> str:
    out = run_cmd(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"], env, 30)
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else ""


def wait_job(job_id: str, env: dict[str, str], timeout: float) -> str:
    """The final state of a job (COMPLETED, FAILED, ...) once it left the queue; fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_state(job_id, env)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(1)
    subprocess.run(["scancel", job_id], env=env, capture_output=True, timeout=30)
    raise AssertionError(f"Slurm job {job_id} did not finish within {timeout} s (cancelled)")
