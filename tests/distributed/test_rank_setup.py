"""A rank joining a group that torchrun or srun started: the start-up timeout (trainer.dist_timeout_s) names
the rendezvous and the missing ranks, restarts under torchrun --max-restarts join again, and every rank
limits its intra-op threads."""
from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from kdrun.runtime import distributed as D
from tests.distributed.conftest import env, free_port


def test_threads_from_slurm_cpus_per_task_else_cores_per_local_rank() -> None:
    slurm = D.LaunchEnv(0, 4, 0, None, "n0", 1, "slurm")
    assert D.rank_threads(slurm, {"OMP_NUM_THREADS": "3", "SLURM_CPUS_PER_TASK": "8"}, cores=16) == \
        (None, "OMP_NUM_THREADS=3")  # the user's setting wins (torch reads it itself)
    assert D.rank_threads(slurm, {"SLURM_CPUS_PER_TASK": "4"}, cores=16) == (4, "SLURM_CPUS_PER_TASK=4")
    assert D.rank_threads(slurm, {"SLURM_CPUS_PER_TASK": "4"}, cores=2)[0] == 2  # never above the usable cores
    # srun without --cpus-per-task, 2 tasks on each of 2 nodes: the node's cores are shared
    assert D.rank_threads(slurm, {"SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_NODEID": "1"}, cores=16) == \
        (8, "16 cores / 2 ranks on this node")
    # torchrun's workers share the cores of their node, whatever Slurm gave the torchrun task
    torchrun = D.LaunchEnv(0, 8, 0, 4, "n0", 1, "torchrun")
    assert D.rank_threads(torchrun, {"SLURM_CPUS_PER_TASK": "16"}, cores=16) == (4, "16 cores / 4 ranks on this node")
    assert D.rank_threads(torchrun, {}, cores=2)[0] == 1  # at least one


def test_tasks_on_this_node_reads_slurms_task_layouts() -> None:
    assert D.tasks_on_this_node({"SLURM_NTASKS_PER_NODE": "8"}) == 8
    layout = {"SLURM_TASKS_PER_NODE": "2(x3),1"}
    assert [D.tasks_on_this_node({**layout, "SLURM_NODEID": str(n)}) for n in range(4)] == [2, 2, 2, 1]
    assert D.tasks_on_this_node({**layout, "SLURM_STEP_TASKS_PER_NODE": "4", "SLURM_NODEID": "0"}) == 4  # the step's
    assert D.tasks_on_this_node({}) is None
    e = D.launch_env({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1", "SLURM_NODEID": "0",
                      "SLURM_STEP_TASKS_PER_NODE": "2", "MASTER_ADDR": "n0", "MASTER_PORT": "1"})
    assert e is not None and e.local_world_size == 2


def test_a_rank_that_cannot_reach_the_rendezvous_says_where_within_the_timeout() -> None:
    port = free_port()  # nobody listens there: rank 0 was never started
    start = time.monotonic()
    with pytest.raises(D.JoinError) as e:
        D.join(D.LaunchEnv(1, 3, 1, None, "127.0.0.1", port, "slurm"), timeout_s=2)
    assert time.monotonic() - start < 30
    assert str(e.value).startswith(f"rank 1 could not reach the rendezvous 127.0.0.1:{port}, which rank 0 hosts, "
                                   "within trainer.dist_timeout_s=2 s (world size 3, started by slurm; torch: ")


def test_missing_ranks_are_named_after_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torchrun the agent hosts the store, so every rank gets in at once and the ranks that never
    came are found from the check-in keys."""
    port = free_port()
    agent = dist.TCPStore("127.0.0.1", port, world_size=None, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=10))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    agent.set("kdrun/attempt_0/kdrun/joined/2", "node1")  # rank 2 arrived; ranks 1 and 3 never do
    with pytest.raises(D.JoinError) as e:
        D.join(D.LaunchEnv(0, 4, 0, 4, "127.0.0.1", port, "torchrun"), timeout_s=2)
    assert str(e.value) == (f"rank 0 waited trainer.dist_timeout_s=2 s at the rendezvous 127.0.0.1:{port} (world "
                            "size 4, started by torchrun) for ranks 1, 3, which did not join. Check that they were "
                            "started (their logs), or raise trainer.dist_timeout_s.")
    del agent


RESTART = """
import os, signal
from kdrun.runtime import distributed as D
attempt = os.environ["TORCHELASTIC_RESTART_COUNT"]
D.init_process_group("cpu", join_timeout_s=60)
D.barrier()
if D.rank() == 1 and attempt == "0":
    os.kill(os.getpid(), signal.SIGKILL)  # a lost worker: torchrun restarts them all
D.barrier()
print(f"rank {D.rank()} attempt {attempt} done", flush=True)
"""


@pytest.mark.slow
def test_workers_restarted_by_torchrun_max_restarts_join_again(tmp_path: Path) -> None:
    """torch 2.14.1's env:// setup reads the previous attempt's addresses from the agent's store and the
    restarted workers hang or fail in process-group setup; kdrun's per-attempt keys let them meet."""
    script = tmp_path / "restart.py"
    script.write_text(RESTART)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "--max-restarts=1", "--monitor-interval=0.1", str(script)], env=env(), capture_output=True,
                       text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "rank 0 attempt 1 done" in p.stdout and "rank 1 attempt 1 done" in p.stdout
    assert "2 ranks (torchrun); intra-op threads per rank: 1 (OMP_NUM_THREADS=1)" in p.stdout


def test_the_cli_passes_trainer_dist_timeout_s_to_the_join(tmp_path: Path) -> None:
    """The wiring: `kdrun train trainer.dist_timeout_s=2` as rank 1 of an srun job whose rank 0 never
    started fails after ~2 s with the one-paragraph join error, not after the 300 s default."""
    env = {**os.environ, "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    start = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "kdrun.cli", "train", "+debug=quick", "trainer.accelerator=cpu",
                        "trainer.dist_timeout_s=2", f"hydra.run.dir={tmp_path / 'run'}"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "within trainer.dist_timeout_s=2 s" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert time.monotonic() - start < 60
