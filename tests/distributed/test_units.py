"""Launch environment parsing, the stop-signal handler, samplers and settings (no processes started,
except one CLI call that must fail before Hydra runs a job)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
from torch import nn

from kdrun.runtime import distributed as D
from kdrun.runtime import preemption as P
from kdrun.config import ConfigError, validate
from kdrun.engine.environment import sync_batchnorm
from kdrun.commands.launch import resolve_devices
from tests.conftest import compose_cfg
from tests.distributed.conftest import ROOT, env

TORCH_ENV = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
             "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}
SLURM_ENV = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "MASTER_ADDR": "node0",
             "MASTER_PORT": "29500"}


def test_launch_env_reads_torchrun_and_slurm() -> None:
    assert D.launch_env({}) is None
    e = D.launch_env(TORCH_ENV)
    assert e is not None and (e.rank, e.world_size, e.local_rank, e.local_world_size, e.source) == (3, 8, 1, 4, "torchrun")
    e = D.launch_env(SLURM_ENV)
    assert e is not None and (e.rank, e.world_size, e.local_rank, e.master_addr, e.source) == (5, 8, 1, "node0", "slurm")
    # srun torchrun ...: torchrun's per-worker variables win
    e = D.launch_env({**SLURM_ENV, **TORCH_ENV})
    assert e is not None and e.rank == 3 and e.source == "torchrun"
    # a single-task allocation is a plain process (kdrun may spawn its own workers in it)
    assert D.launch_env({**SLURM_ENV, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None


def test_partial_launch_env_names_what_is_missing() -> None:
    with pytest.raises(ConfigError, match="WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are missing"):
        D.launch_env({"RANK": "0"})
    with pytest.raises(ConfigError, match="MASTER_PORT is missing"):
        D.launch_env({k: v for k, v in TORCH_ENV.items() if k != "MASTER_PORT"})
    with pytest.raises(ConfigError, match="SLURM task 5 of 8 but MASTER_ADDR, MASTER_PORT are not set"):
        D.launch_env({k: v for k, v in SLURM_ENV.items() if not k.startswith("MASTER")})
    with pytest.raises(ConfigError, match="RANK='x' must be an integer"):
        D.launch_env({**TORCH_ENV, "RANK": "x"})
    with pytest.raises(ConfigError, match="inconsistent"):
        D.launch_env({**TORCH_ENV, "RANK": "8"})


def test_cli_reports_a_partial_environment_in_one_paragraph() -> None:
    out = subprocess.run([sys.executable, "-m", "kdrun.cli", "train", "trainer.accelerator=cpu"],
                         env={**env(), "LOCAL_RANK": "0"}, cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2
    assert "kdrun: error:" in out.stderr and "RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT are missing" in out.stderr
    assert "Traceback" not in out.stderr


def test_preemption_records_agrees_and_restores() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    with P.Preemption(["SIGUSR1"], check_every=3) as pre:
        assert not pre.should_stop(3)
        os.kill(os.getpid(), signal.SIGUSR1)  # the handler only records it
        assert P.requested()
        assert not pre.should_stop(4) and not pre.should_stop(5)  # checked every 3rd step only
        assert pre.should_stop(6) and pre.signal_name == "SIGUSR1" and pre.exit_code == 0
    assert signal.getsignal(signal.SIGUSR1) is before and not P.requested()


def test_preemption_chains_to_the_previous_handler_but_not_to_keyboardinterrupt() -> None:
    calls: list[int] = []
    old = signal.signal(signal.SIGUSR2, lambda s, f: calls.append(s))  # e.g. submitit's requeue
    try:
        with P.Preemption(["SIGUSR2", "SIGINT"]) as pre:
            os.kill(os.getpid(), signal.SIGUSR2)
            assert pre.should_stop(1)
        assert calls == []  # not from inside the signal: after the checkpoint
        pre.chain()
        assert calls == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, old)
    with P.Preemption(["SIGINT"]) as pre:
        pre._escalate_sigint = False
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt
        assert pre.should_stop(1) and pre.exit_code == 130
    pre.chain()  # Python's default SIGINT handler is not called (it would raise KeyboardInterrupt)


def test_signal_names_are_checked() -> None:
    assert P.parse_signals(["USR1", "SIGTERM", 2]) == [signal.SIGUSR1, signal.SIGTERM, signal.SIGINT]
    with pytest.raises(ConfigError, match="SIGKILL"):
        P.parse_signals(["SIGKILL"])
    with pytest.raises(ConfigError, match="SIGNOPE"):
        P.parse_signals(["SIGNOPE"])


def test_devices_setting() -> None:
    assert resolve_devices("cpu", "auto") == ("cpu", 1)
    assert resolve_devices("cpu", 2) == ("cpu", 2)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_devices("cuda", 2)
    for bad in (0, "two", True):
        with pytest.raises(ConfigError, match=f"trainer.devices={bad!r} must be a number of processes"):
            resolve_devices("cpu", bad)  # type: ignore[arg-type]
    validate(compose_cfg(["trainer.devices=auto"]))


def test_sync_batchnorm_converts_and_refuses_the_cpu() -> None:
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(ConfigError, match="sync_batchnorm=true needs CUDA"):
        sync_batchnorm(net, torch.device("cpu"))
    out = sync_batchnorm(net, torch.device("cuda", 0))  # conversion itself touches no device
    assert isinstance(out[1], nn.SyncBatchNorm) and out[1].weight is net[1].weight


def test_resumable_sampler_skips_into_any_epoch_seeded_sampler() -> None:
    class Epochs(torch.utils.data.Sampler[int]):
        def __init__(self) -> None:
            self.epoch = 0

        def set_epoch(self, e: int) -> None:
            self.epoch = e

        def __iter__(self):  # type: ignore[no-untyped-def]
            return iter(range(self.epoch * 10, self.epoch * 10 + 10))

        def __len__(self) -> int:
            return 10

    s = D.ResumableSampler(Epochs())
    s.set_epoch(2, skip=7)
    assert list(s) == [27, 28, 29] and len(s) == 3
    s.set_epoch(3)
    assert len(list(s)) == 10


def test_slurm_preset_composes_into_an_sbatch_script_with_one_task_per_gpu(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """What `hydra/launcher=slurm` would submit (no SLURM here: the script text only, built by
    submitit's own sbatch writer from the preset's values as hydra-submitit-launcher passes them)."""
    slurm = pytest.importorskip("submitit.slurm.slurm")
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from kdrun.cli import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True,
                      overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                 "hydra.launcher.gpus_per_node=4", f"hydra.sweep.dir={tmp_path}"])
    OmegaConf.set_struct(cfg, False)
    cfg.hydra.job.name = "kdrun"
    p = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert p["tasks_per_node"] == 4  # follows gpus_per_node
    names = slurm.SlurmExecutor._equivalence_dict()
    keys = set(slurm._make_sbatch_string.__code__.co_varnames)
    args = {names.get(k, k): v for k, v in p.items() if names.get(k, k) in keys and v is not None}
    script = slurm._make_sbatch_string(command="python -u -m submitit.core._submit x", folder=tmp_path, **args)
    for line in ("--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu", "--signal=USR2@120",
                 "export MASTER_ADDR=$(scontrol show hostnames", "export MASTER_PORT="):
        assert line in script, line


def test_each_rank_gets_its_own_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert [D.cuda_index(r) for r in range(4)] == [0, 1, 2, 3]  # every process sees the node's GPUs
    with pytest.raises(ConfigError, match="local rank 5 has no GPU"):
        D.cuda_index(5)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert D.cuda_index(5) == 0  # srun --gpus-per-task=1: the one GPU this process sees
