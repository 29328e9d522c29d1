"""Process-group helpers: rank facts, reductions, samplers that are exact under DDP, and joining a
process group that someone else launched.

Everything here is a no-op on one process, so the engine has a single code path. Who starts the
processes: :mod:`kdrun.commands.launch` (``trainer.devices=N`` on one machine, torch's elastic launcher) or an
outside launcher (``torchrun``, SLURM's ``srun``), whose environment :func:`launch_env` reads.
"""
from __future__ import annotations

import datetime
import itertools
import os
import re
import socket
import time
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Sampler

from kdrun.config import ConfigError


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def all_reduce_mean(t: Tensor) -> Tensor:
    """Average across ranks (a new tensor; the input is untouched)."""
    if not is_dist():
        return t
    out = t.detach().clone() if not t.requires_grad else t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def all_reduce_sum(t: Tensor) -> Tensor:
    if not is_dist():
        return t
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def barrier() -> None:
    if is_dist():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled; for small things such as a path or a decision)."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (pickled; for small per-rank state such as RNG states)."""
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_max_int(value: int) -> int:
    """The largest ``value`` over all ranks, as a host int.

    The tensor lives on the CPU whenever the process group has a CPU backend (kdrun initialises
    ``cpu:gloo,cuda:nccl``), so this never waits on the GPU stream; with a bare NCCL group it
    falls back to the current CUDA device.
    """
    if not is_dist():
        return value
    device = torch.device("cpu")
    if "gloo" not in str(dist.get_backend()) and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


# ---------------------------------------------------------------------------------------------------
# Joining a process group started by torchrun, SLURM's srun, or kdrun's own launcher.

TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
SLURM_VARS = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in a job that an outside launcher started."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int | None
    master_addr: str
    master_port: int
    source: str  # "torchrun" (also kdrun's own workers) or "slurm"


def _int(environ: Mapping[str, str], key: str) -> int:
    try:
        return int(environ[key])
    except ValueError:
        raise ConfigError(f"environment variable {key}={environ[key]!r} must be an integer.") from None


def launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv | None:
    """The launch facts in the environment, or ``None`` for a plain single process.

    torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) win over SLURM's,
    because ``srun torchrun ...`` sets both and torchrun's are the per-worker ones. Under ``srun``
    alone (one task per GPU) the rank comes from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID and the
    rendezvous address from MASTER_ADDR/MASTER_PORT, which the batch script must export (SLURM has no
    such variable). A partial set is an error that names what is missing: guessing would either hang
    waiting for ranks that never come or silently train on one process.
    """
    env = os.environ if environ is None else environ
    torch_set = [k for k in TORCH_VARS[:3] if k in env]
    if torch_set:
        missing = [k for k in TORCH_VARS if k not in env]
        if missing:
            raise ConfigError(
                f"the environment looks like a torchrun/torch.distributed launch ({', '.join(torch_set)} "
                f"set) but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing; set all of "
                f"{', '.join(TORCH_VARS)} (torchrun does) or none of them.")
        lws = env.get("LOCAL_WORLD_SIZE")
        out = LaunchEnv(_int(env, "RANK"), _int(env, "WORLD_SIZE"), _int(env, "LOCAL_RANK"),
                        int(lws) if lws and lws.isdigit() else None, env["MASTER_ADDR"],
                        _int(env, "MASTER_PORT"), "torchrun")
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env and _int(env, "SLURM_NTASKS") > 1:
        # One SLURM task of several: join them (a single-task allocation is an ordinary process, so
        # kdrun may still spawn trainer.devices workers in it).
        missing = [k for k in (*SLURM_VARS, "MASTER_ADDR", "MASTER_PORT") if k not in env]
        if missing:
            raise ConfigError(
                f"kdrun runs as SLURM task {env['SLURM_PROCID']} of {env['SLURM_NTASKS']} but "
                f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set. Export MASTER_ADDR "
                "and MASTER_PORT in the batch script before srun, e.g. MASTER_ADDR=$(scontrol show "
                "hostnames \"$SLURM_JOB_NODELIST\" | head -n 1) MASTER_PORT=29500 (see README, "
                "'Multi-GPU and multi-node'), or start one task per node with torchrun.")
        out = LaunchEnv(_int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"), _int(env, "SLURM_LOCALID"),
                        tasks_on_this_node(env), env["MASTER_ADDR"], _int(env, "MASTER_PORT"), "slurm")
    else:
        return None
    if not 0 <= out.rank < out.world_size or out.local_rank < 0:
        raise ConfigError(f"inconsistent launch environment: rank {out.rank}, world size {out.world_size}, "
                          f"local rank {out.local_rank}.")
    return out


def device_type(accelerator: str) -> str:
    """``cuda`` or ``cpu`` for ``trainer.accelerator`` (auto: CUDA when a GPU is visible)."""
    if accelerator == "cuda" or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def backend_for(dev_type: str) -> str:
    """NCCL for CUDA tensors plus gloo for CPU tensors (small control messages such as the stop flag
    stay on the host); gloo alone on the CPU."""
    return "cpu:gloo,cuda:nccl" if dev_type == "cuda" else "gloo"


DEFAULT_JOIN_TIMEOUT_S = 300.0  # trainer.dist_timeout_s's default


class JoinError(ConfigError):
    """A rank could not meet the others at the rendezvous in time (a ConfigError: one paragraph, exit 2; the
    fix is in how the job was launched)."""


def init_process_group(dev_type: str, env: LaunchEnv | None = None, timeout_s: float = 1800.0,
                       join_timeout_s: float = DEFAULT_JOIN_TIMEOUT_S) -> None:
    """Join the process group described by ``env`` (default: :func:`launch_env`).

    Exports the torch variables (so ``env://`` works after a SLURM launch, and ``LOCAL_RANK`` picks
    the GPU in :func:`kdrun.engine.environment.pick_device`) and binds this process to its GPU before NCCL starts,
    so that ranks never share a device. A no-op when already initialised or on one process.

    ``join_timeout_s`` (``trainer.dist_timeout_s``) bounds the start-up only: a rank that has not met all
    the others by then raises :class:`JoinError` naming the rendezvous and the missing ranks
    (:func:`join`); ``timeout_s`` is the collectives' timeout afterwards (a rank may legitimately wait long
    at a barrier while rank 0 writes a checkpoint). Then every rank sets its intra-op threads
    (:func:`set_rank_threads`).
    """
    if is_dist():
        return
    env = env or launch_env()
    if env is None or env.world_size <= 1:
        return
    os.environ.update({"RANK": str(env.rank), "WORLD_SIZE": str(env.world_size),
                       "LOCAL_RANK": str(env.local_rank), "MASTER_ADDR": env.master_addr,
                       "MASTER_PORT": str(env.master_port)})
    if dev_type == "cuda":
        torch.cuda.set_device(cuda_index(env.local_rank))
    store = join(env, join_timeout_s)
    store.set_timeout(datetime.timedelta(seconds=timeout_s))
    dist.init_process_group(backend=backend_for(dev_type), store=store, rank=env.rank,
                            world_size=env.world_size, timeout=datetime.timedelta(seconds=timeout_s))
    threads, why = set_rank_threads(env)
    if env.rank == 0:
        print(f"[kdrun] {env.world_size} ranks ({env.source}); intra-op threads per rank: {threads} ({why})",
              flush=True)


def join(env: LaunchEnv, timeout_s: float) -> "dist.Store":
    """Torch's own ``env://`` rendezvous (rank 0, or torchrun's agent, hosts the store at MASTER_ADDR:PORT),
    then every rank checks in under ``kdrun/joined/<rank>`` and waits for all the others, so that a rank that
    never comes is named after ``timeout_s`` instead of the group hanging.

    Under torchrun every restart attempt (``--max-restarts``) gets its own key prefix: torch 2.14's
    ``env://`` reuses the agent's store across attempts without one (its comment says each retry gets a new
    store, which the agent's store is not), so the restarted workers read the previous attempt's gloo
    addresses and hang or fail connecting."""
    where = f"{env.master_addr}:{env.master_port}"
    others = [r for r in range(env.world_size) if r != env.rank]
    limit = f"trainer.dist_timeout_s={timeout_s:g} s"
    start = time.monotonic()
    try:
        store, _, _ = next(dist.rendezvous("env://", env.rank, env.world_size,
                                           timeout=datetime.timedelta(seconds=timeout_s)))
    except (RuntimeError, ValueError, TimeoutError) as e:  # DistStoreError is a RuntimeError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if env.rank == 0:
            what = f"rank 0 hosts the rendezvous {where} and waited {limit} for ranks {_ranks(others)} to connect"
        else:
            what = f"rank {env.rank} could not reach the rendezvous {where}, which rank 0 hosts, within {limit}"
        raise JoinError(f"{what} (world size {env.world_size}, started by {env.source}; torch: {first}). Check "
                        "that every rank was started and that MASTER_ADDR/MASTER_PORT name rank 0's node and a free "
                        "port, or raise trainer.dist_timeout_s.") from None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is not None:
        store = dist.PrefixStore(f"kdrun/attempt_{attempt}", store)
    store.set(f"kdrun/joined/{env.rank}", socket.gethostname())
    keys = [f"kdrun/joined/{r}" for r in range(env.world_size)]
    try:
        store.wait(keys, datetime.timedelta(seconds=max(1.0, timeout_s - (time.monotonic() - start))))
    except (RuntimeError, TimeoutError):
        missing = [r for r in range(env.world_size) if not store.check([keys[r]])]
        raise JoinError(f"rank {env.rank} waited {limit} at the rendezvous {where} (world size {env.world_size}, "
                        f"started by {env.source}) for ranks {_ranks(missing)}, which did not join. Check that they "
                        "were started (their logs), or raise trainer.dist_timeout_s.") from None
    return store


def _ranks(ranks: list[int]) -> str:
    """``1-3, 5``: rank numbers, runs collapsed."""
    out: list[str] = []
    for r in ranks:
        if out and r == int(out[-1].split("-")[-1]) + 1:
            out[-1] = f"{out[-1].split('-')[0]}-{r}"
        else:
            out.append(str(r))
    return ", ".join(out) or "none"


def tasks_on_this_node(environ: Mapping[str, str] | None = None) -> int | None:
    """How many tasks of this SLURM step run on this node: SLURM_NTASKS_PER_NODE when given, else this
    node's entry of SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE (``2(x3),1``: 2 on each of the first
    three nodes, 1 on the fourth), indexed by SLURM_NODEID."""
    env = os.environ if environ is None else environ
    if env.get("SLURM_NTASKS_PER_NODE", "").isdigit():
        return int(env["SLURM_NTASKS_PER_NODE"])
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    node = env.get("SLURM_NODEID", "0")
    if not spec or not node.isdigit():
        return None
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            return None
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[int(node)] if int(node) < len(counts) else None


def rank_threads(env: LaunchEnv, environ: Mapping[str, str] | None = None,
                 cores: int | None = None) -> tuple[int | None, str]:
    """Intra-op threads for one rank and why: ``(None, ...)`` when OMP_NUM_THREADS is set (torch reads it
    itself); else SLURM_CPUS_PER_TASK under srun (the CPUs Slurm gave this task); else the cores this
    process may run on divided by the ranks on this node (torchrun's workers share them, and so do srun
    tasks that Slurm did not pin). Never more than the cores this process may use, never fewer than 1.

    Without this every rank starts one thread per core of the node: with 8 ranks on 8 cores that is 64
    spinning threads (2 unpinned srun ranks on the test cluster's 2 busy cores: 153 instead of 3919 images/s)."""
    e = os.environ if environ is None else environ
    if e.get("OMP_NUM_THREADS"):
        return None, f"OMP_NUM_THREADS={e['OMP_NUM_THREADS']}"
    if cores is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cores = os.cpu_count() or 1
    if env.source == "slurm" and e.get("SLURM_CPUS_PER_TASK", "").isdigit():
        n = int(e["SLURM_CPUS_PER_TASK"])
        return max(1, min(n, cores)), f"SLURM_CPUS_PER_TASK={n}" + (f", {cores} usable cores" if cores < n else "")
    local = env.local_world_size or (tasks_on_this_node(e) if env.source == "slurm" else None) or 1
    return max(1, cores // local), f"{cores} cores / {local} rank{'s' * (local != 1)} on this node"


def set_rank_threads(env: LaunchEnv) -> tuple[int, str]:
    """Apply :func:`rank_threads`; returns (threads now in use, why)."""
    n, why = rank_threads(env)
    if n is not None:
        torch.set_num_threads(n)
    return torch.get_num_threads(), why


def cuda_index(local_rank: int) -> int:
    """The GPU of the process with this local rank: GPU ``local_rank`` when each process sees all of
    the node's GPUs, GPU 0 when the launcher gave each process its own (``srun --gpus-per-task=1``
    sets CUDA_VISIBLE_DEVICES per task)."""
    n = torch.cuda.device_count()
    if local_rank < n:
        return local_rank
    if n == 1:
        return 0
    raise ConfigError(f"local rank {local_rank} has no GPU: {n} are visible to it; start at most that many "
                      "processes per node, or give each process its own GPU (CUDA_VISIBLE_DEVICES).")


def destroy_process_group() -> None:
    if is_dist():
        dist.destroy_process_group()


class TrainSampler(Sampler[int]):
    """Shuffled, rank-sharded indices whose order depends only on (seed, epoch), with a start offset.

    The order is torch.randperm seeded with ``seed + epoch`` (as ``DistributedSampler``), so an
    interrupted run resumed at step s of an epoch sees exactly the batches it would have seen:
    ``set_epoch(e, skip=s * batch_size)`` drops the indices already consumed. Each rank takes every
    ``world``-th index of the permutation, truncated so all ranks get the same number (``drop_last``
    semantics; training never pads with duplicates).
    """

    def __init__(self, length: int, seed: int, num_replicas: int | None = None, rank_: int | None = None) -> None:
        self.length, self.seed = length, seed
        self.world = world_size() if num_replicas is None else num_replicas
        self.rank = rank() if rank_ is None else rank_
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def per_rank(self) -> int:
        return self.length // self.world

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.length, generator=g)
        mine = perm[self.rank::self.world][: self.per_rank()]
        return iter(mine[self.skip:].tolist())

    def __len__(self) -> int:
        return max(0, self.per_rank() - self.skip)


class ResumableSampler(Sampler[int]):
    """Gives any epoch-seeded sampler (DeiT's RepeatAugSampler) :class:`TrainSampler`'s resume offset:
    ``set_epoch(e, skip=k)`` drops the first ``k`` indices of epoch ``e``'s order, so a run stopped
    mid-epoch continues with exactly the batches it had not seen."""

    def __init__(self, base: Sampler[int]) -> None:
        self.base, self.skip = base, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.base.set_epoch(epoch)  # type: ignore[attr-defined]
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.base), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.base) - self.skip)  # type: ignore[arg-type]


class EvalSampler(Sampler[int]):
    """Rank ``r`` takes indices r, r+world, …: every sample is evaluated exactly once (no padding),
    and per-rank counts are summed, so distributed top-1 equals single-process top-1."""

    def __init__(self, length: int) -> None:
        self.length, self.world, self.rank = length, world_size(), rank()

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world))
