"""``trainer.devices=N`` on one machine: kdrun starts N worker processes with torch's elastic launcher.

This is the machinery behind ``torchrun`` (``torch.distributed.launcher.api.elastic_launch``), used as a
library: a c10d rendezvous on a free local port, one worker program (``python -m kdrun.commands.launch``) per
device with RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set, NCCL (plus gloo for small
CPU messages) with one GPU per worker on CUDA, gloo on the CPU. What the parent decides once and hands
to the workers:

* the **run directory** (Hydra's output directory in the parent): no worker composes a config or
  resolves ``${now:...}`` itself, so there is exactly one run directory;
* the **resolved config**, as a YAML file: workers do not re-compose with Hydra (a re-composition
  could differ: environment interpolations, ``${now:}``, a recipe file edited meanwhile).

**Signals.** The elastic agent in the parent catches SIGTERM/SIGINT/SIGHUP/SIGQUIT and the configured
``trainer.preempt_signals``, forwards the signal to the workers, waits up to ``trainer.preempt_grace_s``
for them to exit and then kills them. The workers (kdrun.runtime.preemption) checkpoint at the next step
boundary and exit 0; the parent recognises that orderly stop by the marker rank 0 wrote
(``preempted.json``) and exits 0 (130 for SIGINT) too; otherwise it reads rank 0's ``results.json``. A handler that was installed before the launch
(submitit's requeue on SIGUSR2) is called afterwards.

Multi-node jobs are not started from here: run one ``kdrun train`` per GPU under ``srun`` or one
``torchrun`` per node; :func:`kdrun.runtime.distributed.launch_env` then joins the existing process group.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from kdrun.runtime import distributed
from kdrun.runtime import preemption
from kdrun.config import ConfigError
from kdrun.errors import find_user_error, full_traceback_requested

# What the elastic agent always handles (it shuts the workers down on these), plus kdrun's own.
AGENT_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")


class WorkerFailed(RuntimeError):
    """A worker exited with an error; ``exit_code`` is what the CLI should exit with."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Stopped(Exception):
    """The parent received a stop signal while the workers ran (they have been told and waited for)."""

    def __init__(self, signum: int, previous: dict[int, Any]) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum, self.previous = signum, previous


def check_devices(devices: Any) -> None:
    if devices != "auto" and (isinstance(devices, bool) or not isinstance(devices, int) or devices < 1):
        raise ConfigError(f"trainer.devices={devices!r} must be a number of processes (an integer >= 1) "
                          "or auto (every visible GPU).")


def resolve_devices(accelerator: str, devices: int | str) -> tuple[str, int]:
    """(device type, number of processes) for ``trainer.accelerator`` / ``trainer.devices``."""
    check_devices(devices)
    dev = distributed.device_type(accelerator)
    if dev == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("trainer.accelerator=cuda but no CUDA device is visible; use "
                              "trainer.accelerator=cpu or auto.")
        visible = torch.cuda.device_count()
        n = visible if devices == "auto" else int(devices)
        if n > visible:
            raise ConfigError(f"trainer.devices={devices} but only {visible} GPU(s) are visible "
                              "(CUDA_VISIBLE_DEVICES); lower trainer.devices or use trainer.devices=auto.")
        return dev, n
    # On the CPU "auto" is one process: several gloo processes only pay off for testing DDP.
    return dev, 1 if devices == "auto" else int(devices)


def threads_per_worker(nproc: int) -> int:
    """Intra-op threads per worker: the machine's cores split between the workers (torchrun instead
    sets 1), unless OMP_NUM_THREADS says otherwise; oversubscribed cores slow every worker down."""
    if os.environ.get("OMP_NUM_THREADS"):
        return 0  # respected by torch itself
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, nproc))


def spawn(entrypoint: Callable[..., Any] | str, args: Sequence[Any], nproc: int, *,
          signals: Sequence[str] = preemption.DEFAULT_SIGNALS, grace_s: float = 120.0,
          run_id: str | None = None) -> dict[int, Any]:
    """Run ``entrypoint(*args)`` (a function, or a program and its arguments) in ``nproc`` local
    processes that can join one process group.

    Returns ``{rank: return value}`` (``None`` for a program). Raises :class:`Stopped` when this
    process got a stop signal (after the workers were told and have exited or were killed),
    :class:`WorkerFailed` when a worker failed. The signal handlers and environment the elastic agent
    changes are restored afterwards (a sweep launches again in the same process).
    """
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    names = list(dict.fromkeys([*AGENT_SIGNALS, *(s.name for s in preemption.parse_signals(signals))]))
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc,
        run_id=run_id or f"kdrun-{uuid.uuid4().hex[:12]}",
        # torchrun --standalone: a c10d store on a free local port, nothing to configure.
        rdzv_backend="c10d", rdzv_endpoint="localhost:0",
        # No automatic restarts: a restart re-runs the entrypoint from scratch, and a deterministic
        # error would just repeat; resume is explicit (trainer.resume=auto).
        max_restarts=0, monitor_interval=0.1, start_method="spawn",
        signals_to_handle=",".join(names), shutdown_timeout=max(1, int(grace_s)),
    )
    handled = [getattr(signal, n) for n in names]
    previous = {int(s): signal.getsignal(s) for s in handled}
    saved_env = os.environ.get("TORCHELASTIC_SIGNALS_TO_HANDLE")
    elastic_log = logging.getLogger("torch.distributed.elastic")
    saved_level = elastic_log.level
    # Its INFO lines (rendezvous details) would drown the run's output; KDRUN_ELASTIC_LOG_LEVEL=20
    # shows them when debugging a launch.
    elastic_log.setLevel(int(os.environ.get("KDRUN_ELASTIC_LOG_LEVEL", logging.WARNING)))
    try:
        return elastic_launch(config, entrypoint)(*args)
    except SignalException as e:
        raise Stopped(int(e.sigval), previous) from None
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()  # the earliest: the others were stopped because of it
        if failure.exitcode == 2:  # a user error, already printed as one paragraph by the worker
            raise WorkerFailed("", exit_code=2) from None
        detail = failure.message if isinstance(failure.message, str) else str(failure.message)
        raise WorkerFailed(
            f"worker rank {rank} failed with exit code {failure.exitcode}"
            + (f" ({failure.signal_name()})" if failure.exitcode < 0 else "")
            + (f":\n{detail.strip()[-3000:]}" if detail and detail != "<N/A>" else " (its output is above)"),
            exit_code=1) from None
    finally:
        if threading.current_thread() is threading.main_thread():  # only there were they replaced
            for sig, old in previous.items():
                signal.signal(sig, old if old is not None else signal.SIG_DFL)
        if saved_env is None:
            os.environ.pop("TORCHELASTIC_SIGNALS_TO_HANDLE", None)
        else:
            os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = saved_env
        elastic_log.setLevel(saved_level)
        remove_if_no_files(config.logs_specs.root_log_dir)  # type: ignore[union-attr]


def remove_if_no_files(root: str | None) -> None:
    """The elastic agent makes a log directory per launch (/tmp/torchelastic_*); without redirected
    output it only holds empty per-worker folders, unless a worker left an error file: keep it then."""
    if not root or not os.path.isdir(root):
        return
    if not any(files for _, _, files in os.walk(root)):
        shutil.rmtree(root, ignore_errors=True)


def die_with_launcher(grace_s: float, poll_s: float = 0.5) -> threading.Thread:
    """A worker whose launcher died (``kill -9`` of ``kdrun train``) would train on, orphaned, holding its
    GPU. A daemon thread watches the parent process: once the worker has been re-parented, it sends
    itself SIGTERM, which the training loop turns into an orderly stop (every orphaned rank gets it, so
    they agree on the step and write ``last.pt``; before the loop, SIGTERM's default action ends the
    process), and SIGKILL after ``grace_s`` if it is still alive. Polling, not ``PR_SET_PDEATHSIG``:
    that fires when the parent *thread* that forked the worker ends, which the elastic agent does not
    guarantee to be the launcher's main thread."""
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(poll_s)
        print(f"[kdrun] the launcher (pid {launcher}) is gone: stopping this worker (pid {os.getpid()})",
              file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os.kill(os.getpid(), signal.SIGKILL)

    thread = threading.Thread(target=watch, name="kdrun-launcher-watch", daemon=True)
    thread.start()
    return thread


def train_worker(cfg_path: str, run_dir: str, dev_type: str, threads: int, record_path: str = "") -> int:
    """One worker: join the process group the launcher prepared, train, leave; the exit status.

    Runs as its own program (``python -m kdrun.commands.launch ...``), as torchrun's workers do: a worker that
    stopped after a signal simply exits, while a multiprocessing worker would wait for the agent to
    collect its return value (which an agent shutting down never does) until it is killed."""
    from kdrun.engine import train

    cfg = OmegaConf.load(cfg_path)
    record = json.loads(Path(record_path).read_text()) if record_path else {}
    # rank 0 writes results.json, or preempted.json after a stop
    return in_process_group(dev_type, threads, cfg, lambda: train(cfg, Path(run_dir), record))


def in_process_group(dev_type: str, threads: int, cfg: DictConfig, work: Callable[[], Any]) -> int:
    """A worker's life: join the process group, ``work()``, leave; the exit status (2: a user error, said
    as one paragraph by every rank that hit it)."""
    if threads:
        torch.set_num_threads(threads)
    die_with_launcher(float(OmegaConf.select(cfg, "trainer.preempt_grace_s", default=120.0)))
    distributed.init_process_group(dev_type)
    try:
        try:
            work()
        except Exception as e:
            # The same errors the CLI reports as one paragraph, also when instantiate wrapped them.
            user = find_user_error(e)
            if user is None or full_traceback_requested():
                raise
            # Every rank says it: most such errors are the same on all ranks (the parent validated the
            # config already), but one that only some rank hit must not go unreported.
            who = "" if distributed.is_main() else f" (rank {distributed.rank()})"
            print(f"kdrun: error{who}: {user}", file=sys.stderr, flush=True)
            return 2
        return 0  # an orderly stop too: the launcher tells it from a finished run by the marker
    finally:
        distributed.destroy_process_group()


def spawn_workers(args: Sequence[str], nproc: int, signals: Sequence[str], grace_s: float) -> Stopped | None:
    """``python <args>`` in ``nproc`` local workers (:func:`spawn`): None when they ended by themselves,
    the :class:`Stopped` when a stop signal ended them (one job's launch and a group's read it alike)."""
    try:
        spawn(sys.executable, args, nproc, signals=signals, grace_s=grace_s)
    except Stopped as e:
        return e
    return None


def launch_train(cfg: DictConfig, run_dir: Path, nproc: int, dev_type: str, signals: Sequence[str],
                 grace_s: float, record: dict[str, str] | None = None) -> dict[str, Any]:
    """Train ``cfg`` in ``nproc`` local workers writing to ``run_dir``; rank 0's results.

    ``cfg`` must be validated already (the parent fails fast, before any worker starts). After a stop
    signal the result is ``{"preempted": NAME, "exit_code": 0|130, ...}`` when the workers saved their
    checkpoint; otherwise :class:`WorkerFailed`.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    # The resolved config goes to the workers as a file (a command line has size limits); it is only
    # needed until they have read it, and config.yaml in the run directory keeps the same content.
    fd, cfg_path = tempfile.mkstemp(prefix="kdrun-config-", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        f.write(OmegaConf.to_yaml(cfg, resolve=True))
    fd, record_path = tempfile.mkstemp(prefix="kdrun-record-", suffix=".json")  # .hydra/ for rank 0
    with os.fdopen(fd, "w") as f:
        json.dump(record or {}, f)
    args = ["-m", "kdrun.commands.launch", cfg_path, str(run_dir), dev_type, str(threads_per_worker(nproc)), record_path]
    try:
        stop_signal = spawn_workers(args, nproc, signals, grace_s)
    finally:
        os.unlink(cfg_path)
        os.unlink(record_path)
    marker = preemption.read_marker(run_dir, newer_than=started)
    if stop_signal is not None and marker is None:
        raise WorkerFailed(
            f"{signal.Signals(stop_signal.signum).name}: the workers did not write a checkpoint within "
            f"trainer.preempt_grace_s={grace_s:g} s and were killed; {run_dir / 'last.pt'} (or "
            "last.pt.prev) holds the last saved state.", exit_code=128 + stop_signal.signum)
    if marker is not None:  # the workers stopped after a signal (sent to this process or to them)
        name = signal.Signals(stop_signal.signum).name if stop_signal else marker.get("signal")
        if stop_signal is not None:
            preemption.chain_previous(stop_signal.signum, stop_signal.previous)  # e.g. submitit's requeue
        return {"run_dir": str(run_dir), "preempted": name, "exit_code": 130 if name == "SIGINT" else 0,
                "steps": marker.get("step"), "epochs": marker.get("epoch"),
                "epoch_step": marker.get("epoch_step"), "world_size": nproc,
                "checkpoint": str(run_dir / "last.pt")}
    results = run_dir / "results.json"
    if results.is_file() and results.stat().st_mtime < started:  # rank 0 found the run finished
        state = json.loads(results.read_text())
        why = f"step {state.get('steps')}, as its results.json says"
        return {"run_dir": str(run_dir), "finished": why, "steps": state.get("steps"),
                "epochs": state.get("epochs"), "results": str(results)}
    return json.loads(results.read_text())


def dispatch(cfg: DictConfig, checked: DictConfig, settings: Any, run_dir: Path,
             record: dict[str, str]) -> dict[str, Any]:
    """Train ``cfg`` where this process stands, the one place that decides it: join the job that
    torchrun/srun started (every rank runs this), start ``trainer.devices`` local workers, or train
    alone. ``checked``: ``cfg`` validated and resolved (what the workers read); ``settings``: its
    ``TrainerConfig``; ``record``: the ``.hydra/`` files written when the run starts. The results. Under
    ``hydra/launcher=kdrun_shared`` a job of a group hands its training to the group instead
    (:mod:`kdrun.commands.train_group`)."""
    from kdrun.commands.train_group import active_session
    from kdrun.engine import train

    group = active_session()
    if group is not None:
        return group.take(cfg, checked, settings, run_dir, record)

    # Read the environment here, not before Hydra: under hydra/launcher=submitit_slurm this runs in each
    # SLURM task on the compute nodes, not in the submitting process.
    job_env = distributed.launch_env()
    if job_env is not None and job_env.world_size > 1:
        check_devices(settings.devices)  # the value must be valid, but the job decided the count
        distributed.init_process_group(distributed.device_type(settings.accelerator), job_env,  # once per process
                             join_timeout_s=settings.dist_timeout_s)
        run_dir = Path(distributed.broadcast_object(str(run_dir)))
        if distributed.is_main() and settings.devices not in (1, "auto", job_env.local_world_size):
            print(f"[kdrun] note: trainer.devices={settings.devices} is ignored: {job_env.source} started "
                  f"{job_env.world_size} processes, and kdrun joins them.", file=sys.stderr, flush=True)
        return train(cfg, run_dir, record)
    dev, nproc = resolve_devices(settings.accelerator, settings.devices)
    if nproc > 1:
        return launch_train(checked, run_dir, nproc, dev, settings.preempt_signals, settings.preempt_grace_s,
                            record)
    return train(cfg, run_dir, record)


def group_worker(plan_path: str, dev_type: str, threads: int) -> int:
    """One worker of a group (:func:`launch_group`): join the process group, train the group
    (:func:`kdrun.engine.group.train_group`), and on rank 0 write every job's result where the plan says."""
    from kdrun.engine.group import train_group
    from kdrun.engine.run import json_safe

    plan = json.loads(Path(plan_path).read_text())
    cfgs = [OmegaConf.create(job["config"]) for job in plan["jobs"]]

    def work() -> None:
        results = train_group(cfgs, [Path(job["run_dir"]) for job in plan["jobs"]], [job["record"] for job in plan["jobs"]])
        if distributed.is_main():
            out = Path(plan["results"])
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_text(json.dumps(json_safe(results)))
            os.replace(tmp, out)

    return in_process_group(dev_type, threads, cfgs[0], work)


def launch_group(checked: Sequence[DictConfig], run_dirs: Sequence[Path], nproc: int, dev_type: str,
                 signals: Sequence[str], grace_s: float, records: Sequence[dict[str, str]]) -> list[dict[str, Any]]:
    """Train a group (``checked``: its jobs' validated configs) in ``nproc`` local workers, as
    :func:`launch_train` trains one job; every job's result (rank 0's). A failing worker is
    :class:`WorkerFailed`, as for one job."""
    fd, plan_path = tempfile.mkstemp(prefix="kdrun-group-", suffix=".json")
    results_path = Path(plan_path).with_suffix(".results.json")
    with os.fdopen(fd, "w") as f:  # the configs as files, as for one job (a command line has size limits)
        json.dump({"jobs": [{"config": OmegaConf.to_yaml(c, resolve=True), "run_dir": str(d), "record": r or {}}
                            for c, d, r in zip(checked, run_dirs, records)], "results": str(results_path)}, f)
    args = ["-m", "kdrun.commands.launch", "--group", plan_path, dev_type, str(threads_per_worker(nproc))]
    try:
        stop_signal = spawn_workers(args, nproc, signals, grace_s)
    finally:
        os.unlink(plan_path)
    if not results_path.is_file():
        raise WorkerFailed(
            (f"{signal.Signals(stop_signal.signum).name}: the workers did not write their checkpoints within "
             f"trainer.preempt_grace_s={grace_s:g} s and were killed; each run's last.pt (or last.pt.prev) holds "
             "its last saved state." if stop_signal is not None else "the workers of the group ended without results."),
            exit_code=128 + stop_signal.signum if stop_signal is not None else 1)
    results = json.loads(results_path.read_text())
    results_path.unlink()
    if stop_signal is not None:
        preemption.chain_previous(stop_signal.signum, stop_signal.previous)  # e.g. submitit's requeue
    return results


def dispatch_group(cfgs: Sequence[DictConfig], checked: Sequence[DictConfig], settings: Any,
                   run_dirs: Sequence[Path], records: Sequence[dict[str, str]]) -> list[dict[str, Any]]:
    """:func:`dispatch` for a group (:func:`kdrun.engine.group.train_group`): join the job torchrun/srun
    started, start ``trainer.devices`` local workers, or train here. ``settings``: the ``TrainerConfig`` of
    any of its jobs (the keys read here are data side, equal in a group). Every job's result."""
    from kdrun.engine.group import train_group

    job_env = distributed.launch_env()
    if job_env is not None and job_env.world_size > 1:
        check_devices(settings.devices)
        distributed.init_process_group(distributed.device_type(settings.accelerator), job_env,  # once per process
                                       join_timeout_s=settings.dist_timeout_s)
        run_dirs = [Path(d) for d in distributed.broadcast_object([str(d) for d in run_dirs])]
        return train_group(list(cfgs), list(run_dirs), list(records))
    dev, nproc = resolve_devices(settings.accelerator, settings.devices)
    if nproc > 1:
        return launch_group(checked, run_dirs, nproc, dev, settings.preempt_signals, settings.preempt_grace_s, records)
    return train_group(list(cfgs), list(run_dirs), list(records))


def main(argv: list[str] | None = None) -> None:
    """``python -m kdrun.commands.launch CONFIG RUN_DIR DEVICE_TYPE THREADS [RECORD]``: the worker program
    (``--group PLAN DEVICE_TYPE THREADS``: a worker of a group)."""
    args = sys.argv[1:] if argv is None else argv
    if args[0] == "--group":
        plan_path, dev_type, threads = args[1:]
        sys.exit(group_worker(plan_path, dev_type, int(threads)))
    cfg_path, run_dir, dev_type, threads, *record = args
    sys.exit(train_worker(cfg_path, run_dir, dev_type, int(threads), *record))


if __name__ == "__main__":
    main()
