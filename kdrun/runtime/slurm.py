"""SLURM sweeps (``kdrun train -m hydra/launcher=slurm``): what kdrun adds to hydra-submitit-launcher.

The plugin submits the sweep as one job array with submitit and then waits for every job's result file.
Two things went wrong for a user there, and both are handled here:

* **A refused submission** (``sbatch: error: Invalid generic resource (gres) specification``) surfaced as
  submitit's ``FailedJobError`` traceback. :func:`submission_error` turns it into one paragraph that
  quotes Slurm's reason, names the ``hydra.launcher`` settings the job asked for and, for the reasons we
  know, the setting to change.
* **A job that can never start** (more CPUs per task than any node has: ``Reason=PartitionConfig``; an
  unknown account or QOS; the required nodes unavailable) stays pending, and the plugin waited on it
  forever without a word. :func:`wait_for_jobs` asks ``squeue`` while it waits (``sacct`` needs Slurm's
  accounting database, which many clusters, and the test cluster, do not run), logs every change of a
  job's state, and on one of :data:`NEVER_STARTS` cancels the sweep's jobs and raises :class:`SlurmError`.

The launcher class itself (a subclass of the plugin's ``SlurmLauncher``) has to live in the
``hydra_plugins`` package for Hydra to accept it: ``hydra_plugins/kdrun_slurm_launcher``. This module
holds the logic and imports neither submitit nor the plugin, so that :func:`slurm_error_message` (called
by the CLI for every Hydra error) works without the ``[slurm]`` extra.

``tasks_per_node`` of the preset is the resolver :func:`tasks_per_node`: one task per GPU when the job
asks for GPUs, else ``trainer.devices`` (CPU ranks), else 1 -- so the one preset works on GPU and CPU
partitions.
"""
from __future__ import annotations

import getpass
import logging
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

log = logging.getLogger("kdrun.runtime.slurm")

RESOLVER = "kdrun_slurm_tasks"

# squeue reasons (%r) of a pending job that waiting will not cure, with what to change. Slurm keeps such a
# job pending (it may be changed with `scontrol update`), so without this check a sweep waits forever.
NEVER_STARTS: dict[str, str] = {
    "PartitionConfig": "the request is larger than the partition allows or its nodes have (CPUs per task × "
                       "tasks per node above a node's CPUs, more nodes, GPUs or memory than it has): lower "
                       "hydra.launcher.cpus_per_task, tasks_per_node, gpus_per_node, mem_gb or nodes, or "
                       "choose another hydra.launcher.partition (sinfo -o '%P %D %c %m %G' lists them)",
    "PartitionNodeLimit": "the job asks for more nodes than the partition allows: lower hydra.launcher.nodes",
    "PartitionTimeLimit": "hydra.launcher.timeout_min is above the partition's time limit: lower it",
    "ReqNodeNotAvail": "the nodes the job needs are down, drained or reserved: choose another "
                       "hydra.launcher.partition, or submit again when sinfo shows them up",
    "InvalidAccount": "the account is not valid for you on this cluster: set hydra.launcher.account to one "
                      "of yours (sacctmgr show assoc user=$USER)",
    "InvalidQOS": "the QOS is not valid for you or this partition: set hydra.launcher.qos to one of yours",
    "AccountNotAllowed": "the partition does not admit this account: set hydra.launcher.account or partition",
    "QOSNotAllowed": "the partition does not admit this QOS: set hydra.launcher.qos or partition",
    "BadConstraints": "no node satisfies hydra.launcher.constraint: change it",
    "DependencyNeverSatisfied": "the job depends on a job that failed",
}

# Job states after which a job will not run again (squeue -t all shows them for MinJobAge seconds).
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "SPECIAL_EXIT"}

# sbatch's refusal (its stderr) -> what to change. Matched case-insensitively as substrings.
SUBMIT_HINTS: list[tuple[str, str]] = [
    ("invalid generic resource", "the partition has no such GPUs (gres): on a CPU partition leave "
                                 "hydra.launcher.gpus_per_node unset (null); on a GPU partition check its "
                                 "GPU count with sinfo -o '%P %G'"),
    ("invalid partition", "no partition of that name: set hydra.launcher.partition to one that sinfo lists"),
    ("node configuration is not available", "no node of the partition has that many CPUs, GPUs or that much "
                                            "memory: lower hydra.launcher.cpus_per_task, tasks_per_node, "
                                            "gpus_per_node or mem_gb"),
    ("invalid account", "set hydra.launcher.account to one of your accounts"),
    ("invalid qos", "set hydra.launcher.qos to a QOS you may use"),
    ("time limit", "lower hydra.launcher.timeout_min below the partition's limit"),
    ("invalid numeric value", "every count in hydra.launcher must be a positive integer"),
]


class SlurmError(RuntimeError):
    """Slurm refused the sweep's jobs or says they can never start; the message is for the user verbatim
    (one paragraph, exit 2 through :func:`kdrun.commands.train.hydra_error_message`)."""


def tasks_per_node(gpus_per_node: Any, devices: Any) -> int:
    """The preset's ``tasks_per_node``: one rank per GPU on a GPU request, else ``trainer.devices`` ranks
    (gloo on the CPU), else 1 (``trainer.devices=auto`` on a CPU node is one process, as locally)."""
    if isinstance(gpus_per_node, int) and not isinstance(gpus_per_node, bool) and gpus_per_node > 0:
        return gpus_per_node
    if isinstance(devices, int) and not isinstance(devices, bool) and devices > 0:
        return devices
    return 1


def register_resolvers() -> None:
    """``${kdrun_slurm_tasks:GPUS,DEVICES}`` for conf/hydra/launcher/slurm.yaml (registered when Hydra
    imports the launcher plugin, before any launcher config is resolved)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, tasks_per_node)


def describe_request(params: Mapping[str, Any]) -> str:
    """``partition=debug, nodes=1, tasks_per_node=2, cpus_per_task=1, gpus_per_node=null`` (what the job
    asked for, in the keys of ``hydra.launcher``)."""
    keys = ("partition", "nodes", "tasks_per_node", "cpus_per_task", "gpus_per_node", "mem_gb", "timeout_min",
            "account", "qos", "constraint")
    shown = [f"{k}={'null' if params.get(k) is None else params[k]}" for k in keys
             if k in params and (params.get(k) is not None or k in ("partition", "gpus_per_node"))]
    return ", ".join(shown)


def submission_error(stderr: str, params: Mapping[str, Any]) -> SlurmError:
    """One paragraph for an ``sbatch`` refusal: Slurm's words, the request, the fix."""
    reason = " ".join(line.strip() for line in stderr.strip().splitlines() if line.strip()) or "no message"
    hint = next((h for pattern, h in SUBMIT_HINTS if pattern in reason.lower()),
                "check the hydra.launcher settings (kdrun train -m ... --cfg hydra -p hydra.launcher prints them)")
    return SlurmError(f"Slurm refused the sweep's jobs ({reason}); the jobs asked for {describe_request(params)}. "
                      f"Fix: {hint}.")


def slurm_error_message(e: BaseException) -> Optional[str]:
    """The paragraph of a :class:`SlurmError` in ``e``'s chain (Hydra may wrap the launcher's error), else
    ``None``. For :func:`kdrun.commands.train.hydra_error_message`."""
    seen: set[int] = set()
    cur: Optional[BaseException] = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, SlurmError):
            return str(cur)
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


@dataclass(frozen=True)
class JobState:
    state: str  # PENDING, RUNNING, COMPLETED, ...
    reason: str  # squeue %r: None, Priority, Resources, PartitionConfig, "ReqNodeNotAvail, UnavailableNodes:n1"


def squeue(job_ids: Iterable[str], run: Callable[..., subprocess.CompletedProcess] = subprocess.run
           ) -> Optional[dict[str, JobState]]:
    """The state and reason of every job (array elements one by one: ``5_0``, ``5_1``) of the given job
    ids, finished ones included while Slurm remembers them; ``None`` when squeue itself failed (slurmctld
    busy or restarting: ask again later). A job Slurm has forgotten is simply absent."""
    mains = sorted({str(j).split("_", 1)[0] for j in job_ids})
    if not mains:
        return {}
    # -u: a job id that Slurm has already purged makes `squeue -j` fail as a whole; filtering the user's
    # jobs by id never does.
    cmd = ["squeue", "--noheader", "--array", "--states=all", f"--user={getpass.getuser()}",
           "--format=%i|%T|%r"]
    try:
        out = run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning(f"squeue failed ({e}); asking again later")
        return None
    if out.returncode != 0:
        log.warning(f"squeue failed ({out.stderr.strip() or out.returncode}); asking again later")
        return None
    states: dict[str, JobState] = {}
    for line in out.stdout.splitlines():
        parts = line.strip().split("|", 2)
        if len(parts) == 3 and parts[0].split("_", 1)[0] in mains:
            states[parts[0]] = JobState(parts[1], parts[2])
    return states


def never_starts(reason: str) -> Optional[str]:
    """The :data:`NEVER_STARTS` key ``reason`` starts with (squeue adds details after a comma)."""
    head = reason.split(",", 1)[0].strip()
    return head if head in NEVER_STARTS else None


def wait_for_jobs(jobs: Sequence[Any], params: Mapping[str, Any], labels: Mapping[str, str] | None = None, *,
                  poll_s: Callable[[float], float] = lambda waited: min(60.0, max(2.0, waited / 4)),
                  query: Callable[[Iterable[str]], Optional[dict[str, JobState]]] = squeue,
                  cancel: Callable[[Sequence[str]], None] = lambda ids: subprocess.run(
                      ["scancel", *ids], capture_output=True, timeout=60),
                  sleep: Callable[[float], None] = time.sleep, result_grace_s: float = 15.0) -> None:
    """Return when every job has written its result (``job.paths.result_pickle``; the caller then reads
    the results with submitit). While waiting, every change of a job's state is logged. Raises
    :class:`SlurmError` when a pending job's reason is in :data:`NEVER_STARTS` (all of ``jobs`` are
    cancelled first), or when a job left the queue without a result (failed, cancelled, killed): submitit
    itself would wait for that one forever without ``sacct``.

    ``jobs``: submitit jobs (``job_id``, ``paths``); ``labels``: job id -> its sweep point, for messages.
    squeue is asked 2 s after submission and then less and less often (at most every minute: a large
    cluster's controller must not be polled hard); the result files are looked at every second."""
    labels = labels or {}
    start = time.monotonic()
    seen: dict[str, tuple[str, str]] = {}
    waiting = {str(j.job_id): j for j in jobs}
    ended: dict[str, str] = {}  # job id -> the state it left the queue in (no result yet)
    ended_at: dict[str, float] = {}
    next_query = 0.0
    while True:
        waiting = {i: j for i, j in waiting.items() if not Path(j.paths.result_pickle).exists()}
        if not waiting:
            return
        waited = time.monotonic() - start
        if set(waiting) <= set(ended) and waited - max(ended_at.values()) >= result_grace_s:
            break  # every job still without a result has left the queue, long enough ago
        if waited >= next_query:
            states = query(waiting)
            next_query = waited + poll_s(waited)
            for job_id in list(waiting) if states is not None else []:
                if job_id in ended:
                    continue
                s = states.get(job_id)  # type: ignore[union-attr]
                if s is None:
                    # Not in the queue: just after submission an array element may not be listed yet; after
                    # Slurm's MinJobAge a finished job is forgotten.
                    if waited > 60:
                        ended[job_id] = "gone from the queue"
                        ended_at[job_id] = waited
                    continue
                if seen.get(job_id) != (s.state, s.reason):
                    seen[job_id] = (s.state, s.reason)
                    log.info(f"Slurm job {job_id}: {s.state}" + (f" ({s.reason})" if s.reason not in ("", "None")
                                                                  else ""))
                key = never_starts(s.reason) if s.state == "PENDING" else None
                if key is not None:
                    ids = sorted({str(j.job_id).split("_", 1)[0] for j in jobs})
                    cancel(ids)
                    raise SlurmError(
                        f"Slurm job {job_id}{_label(labels, job_id)} can never start: it is pending with reason "
                        f"{s.reason} ({NEVER_STARTS[key]}). The jobs asked for {describe_request(params)}; the "
                        f"sweep's jobs ({', '.join(ids)}) are cancelled.")
                if s.state in FINISHED:
                    ended[job_id] = s.state  # its result file may still be on its way (a shared file system)
                    ended_at[job_id] = waited
        sleep(1.0)
    job_id = next(i for i in waiting)
    raise job_failed_error(job_id, ended[job_id], waiting[job_id], labels)


def _label(labels: Mapping[str, str], job_id: str) -> str:
    return f" (sweep point {labels[job_id]})" if job_id in labels else ""


def job_failed_error(job_id: str, state: str, job: Any, labels: Mapping[str, str]) -> SlurmError:
    """A job that ended without a result: kdrun's own one-paragraph error from its log when it printed one
    (a user error inside the job exits 2), else the log's last line, and where the log is."""
    err_path = Path(job.paths.stderr)
    try:
        lines = [line.strip() for line in err_path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        lines = []
    ours = [line for line in lines if line.startswith("kdrun: error")]
    said = ours[-1] if ours else next((line for line in reversed(lines) if not line.startswith("srun:")),
                                      "its log is empty")
    return SlurmError(f"Slurm job {job_id}{_label(labels, job_id)} ended ({state}) without a result: {said} "
                      f"(the job's log: {err_path}, and {Path(job.paths.stdout).name} beside it).")
