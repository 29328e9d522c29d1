"""``kdrun train``: the Hydra application over ``conf/`` (``+recipe=NAME`` adds ``recipes/NAME.yaml``).

``run_train`` is Hydra plus :class:`Failures`, the one place that handles what goes wrong; the task is
:func:`train_task` (validate → :func:`kdrun.commands.launch.dispatch` → :func:`report_end`)."""
from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

from kdrun.compose import config_dir
from kdrun.config import ConfigError, unknown_key_message
from kdrun.errors import fail, find_user_error, full_traceback_requested, report
from kdrun.runtime import run_guard


@contextlib.contextmanager
def _env(name: str, value: Optional[str]) -> Iterator[None]:
    """Set (or, with ``None``, unset) an environment variable for the duration of the block."""
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def missing_key_message(e: BaseException) -> Optional[str]:
    """``trainer.epochz=3``: Hydra advises ``+trainer.epochz=3``, which would only move the error to
    validation. Say the key does not exist and name the close matches among the node's keys; keep
    Hydra's advice where it is right (a parameter of the node's ``_target_`` that the config does not
    set, or a target taking ``**kwargs``). ``None`` when ``e`` is not that error."""
    from omegaconf import DictConfig
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    cause = e.__cause__
    node = getattr(cause, "parent_node", None)
    if not isinstance(cause, (ConfigAttributeError, ConfigKeyError)) or not isinstance(node, DictConfig):
        return None
    key, full = str(cause.key), str(cause.full_key)
    path = full[: -len(key) - 1] if full.endswith("." + key) else ""
    if key in node:
        return None
    if len(node) == 0 and path:  # trainer.ema.decay=0.9 while trainer.ema is null (Hydra shows it as {}):
        # "valid keys are (none)" would mislead; the node is set whole, or the key added
        value = str(e).rsplit(" use ", 1)[-1].partition("=")[2] or "..."
        return (f"{path} is null or empty in this config, so {full} cannot be overridden: set the node as a "
                f"whole, {path}={{{key}:{value}}} ({path}={{}} for its defaults), or add the key with "
                f"+{full}={value}.")
    if "_target_" in node:
        import inspect

        from kdrun.config import ConfigError, import_target

        try:
            params = inspect.signature(import_target(str(node["_target_"]), path)).parameters
        except (ConfigError, TypeError, ValueError):
            params = {}
        if key in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            line = str(e).rsplit(" use ", 1)[-1]
            return f"{full} is not set by this config but {node['_target_']} takes it; add it with {line}."
    return unknown_key_message(path, key, list(node.keys()))


def hydra_error_message(e: BaseException) -> Optional[str]:
    """One paragraph for an error Hydra raised before the task function ran (composing the config,
    creating the run directory), or ``None`` for anything else."""
    from hydra.errors import CompactHydraException, ConfigCompositionException
    from omegaconf.errors import OmegaConfBaseException

    from kdrun.errors import missing_option_message
    from kdrun.extras import missing_extra_message
    from kdrun.runtime.slurm import slurm_error_message

    extra = missing_extra_message(e)  # a feature whose pip extra is not installed (hydra/launcher=slurm)
    extra = extra or slurm_error_message(e)  # sbatch refused the sweep's jobs, or one can never start
    if extra is not None:
        return extra
    option = missing_option_message(e)  # balancer=dtoo: the close matches, not every option of the group
    if option is not None:
        return option
    if isinstance(e, ConfigCompositionException):
        message = missing_key_message(e)
        if message is not None:
            return message
        if str(e).startswith("Could not override 'model'."):  # conf/model is reached through the roles
            return ("model=X is not an option: the architecture is chosen with student=X or teacher=X "
                    "(both read conf/model/X.yaml).")
        appended = re.match(r"Could not override '([\w/]+)'\. No match in the defaults list\.\s*"
                            r"To append to your default list use (\+\S+)", str(e))
        if appended:  # `method=deit_kd`: Hydra's two lines as one, with the order that matters after a recipe
            group, fix = appended.groups()
            return (f"{group} is not selected by default, so {fix[1:]} cannot replace a choice: add it with "
                    f"{fix} (after +recipe=NAME, so that its choices replace the recipe's).")
    if isinstance(e, CompactHydraException):  # what Hydra itself prints for these
        cause = e.__cause__
        return str(e) + (f"\n{cause}" if isinstance(cause, OmegaConfBaseException) else "")
    if isinstance(e, OSError):  # Hydra creates the run dir, .hydra/ and the job log before the task
        where = f" {e.filename}" if e.filename else ""
        return (f"cannot create or write the run directory{where} ({e.strerror or e}); set hydra.run.dir "
                "(hydra.sweep.dir with -m) to a writable directory.")
    return None


def run_train(argv: list[str]) -> None:
    """``kdrun train``: one process, N local workers (``trainer.devices=N``), or one rank of a job that
    torchrun/srun started (then every rank runs this; see :func:`kdrun.runtime.distributed.launch_env`). Hydra
    composes the config and calls :func:`train_task`; :class:`Failures` handles what goes wrong."""
    import hydra
    from omegaconf import DictConfig

    failures = Failures(full_traceback_requested())
    argv, scratch = rank_argv(argv, failures)

    @hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
    def _app(cfg: DictConfig) -> float | None:
        with failures.in_task():
            return train_task(cfg)

    sys.argv = ["kdrun train", *argv]
    with failures.in_command(scratch):
        _app()


class Failures:
    """Everything ``kdrun train`` does when something fails, in one place (lightning-hydra-template's
    ``utils.task_wrapper``): a user error is one paragraph, exit 2, and a refused or failed command leaves
    no trace (:mod:`kdrun.runtime.run_guard`).

    Hydra catches what goes wrong *before* the task (composition, the run directory) and prints its own
    text, exit 1; ``HYDRA_FULL_ERROR=1`` is Hydra's documented switch to let those propagate instead, so
    it is set around Hydra (:meth:`in_command`; not inside the task, whose environment, workers included,
    stays the user's) and they are reported here, exit 2. Inside the task (:meth:`in_task`) a user error,
    also one that ``instantiate`` wrapped, is reported as one paragraph; anything else is a bug and keeps
    its traceback (:attr:`task_failed` stops :meth:`in_command` from reading it as Hydra's)."""

    def __init__(self, full_traceback: bool) -> None:
        self.full = full_traceback
        self.task_failed = False  # an exception escaped the task function (not Hydra's own setup)

    @contextlib.contextmanager
    def in_task(self) -> Iterator[None]:
        from kdrun.commands.launch import WorkerFailed

        try:
            with _env("HYDRA_FULL_ERROR", "1" if self.full else None):
                yield
        except WorkerFailed as e:  # the workers reported their error themselves
            if str(e):
                print(f"kdrun: error: {e}", file=sys.stderr, flush=True)
            sys.exit(e.exit_code)
        except Exception as e:
            user = find_user_error(e)
            if user is None:
                self.task_failed = True
                raise
            report(user, self.full)

    @contextlib.contextmanager
    def in_command(self, scratch: str | None) -> Iterator[None]:
        import shutil

        from kdrun.runtime import distributed
        run_guard.begin()  # what exists before Hydra creates the output directories
        succeeded = False
        try:
            with _env("HYDRA_FULL_ERROR", "1"):
                yield
            succeeded = True
        except Exception as e:
            message = None if self.full or self.task_failed else hydra_error_message(e)
            if message is None:
                raise
            fail(message)
        except SystemExit as e:
            succeeded = e.code in (0, None)  # an orderly stop after a signal exits 0 too
            raise
        finally:
            if not succeeded:
                run_guard.undo()  # a refused or failed command leaves no stub directory behind
            distributed.destroy_process_group()
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)


def rank_argv(argv: list[str], failures: Failures) -> tuple[list[str], str | None]:
    """``argv`` for this process, and a scratch directory to remove at exit (or None).

    Under torchrun/srun every rank runs Hydra, but only rank 0's output directory is the run directory
    (it is broadcast later). Hydra writes nothing into a run directory (conf/config.yaml: no .hydra/, no
    log file) and only creates it if missing, so the other ranks point it at the temp directory, which
    exists: no per-rank ${now:...} directory beside the run, and nothing for a kill -9 to leave behind. A
    sweep (-m) writes multirun.yaml, so there a scratch directory is used."""
    import tempfile

    from kdrun.runtime import distributed
    try:
        env = distributed.launch_env()
    except ConfigError as e:
        report(e, failures.full)
    if env is None or env.world_size <= 1 or env.rank == 0:
        return argv, None
    argv = [*argv, f"hydra.run.dir={tempfile.gettempdir()}", "hydra.output_subdir=null"]
    scratch = None
    if any(a in ("-m", "--multirun") for a in argv):
        scratch = tempfile.mkdtemp(prefix=f"kdrun-rank{env.rank}-")
        argv.append(f"hydra.sweep.dir={scratch}/sweep")
    return argv, scratch


def train_task(cfg: Any) -> float | None:
    """The Hydra task of ``kdrun train``, one per job of a sweep: validate → train where the job runs
    (:func:`kdrun.commands.launch.dispatch`) → say how it ended. Returns the final primary metric (what a Hydra
    sweeper optimises)."""
    import copy

    from hydra.core.hydra_config import HydraConfig

    from kdrun.config import validate
    from kdrun.commands.launch import dispatch
    from kdrun.runtime.log_backends import check_backends, name_sweep_group

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    run_guard.note_job_dir(run_dir)
    record = run_guard.hydra_record(cfg)  # .hydra/, written when the run starts
    name_sweep_group(cfg, HydraConfig.get())  # a sweep job's logger.group: the sweep (W&B group, MLflow tag)
    checked = copy.deepcopy(cfg)
    settings = validate(checked)  # fail before any process starts
    check_backends(settings.logger.backends)
    results = dispatch(cfg, checked, settings.trainer, run_dir, record)
    return report_end(results, multirun_dir(HydraConfig.get()))


def report_end(results: dict, sweep_dir: str | None) -> float | None:
    """How the run ended, on the main rank: finished before (nothing done), stopped by a signal (exits,
    which also ends a sweep whose remaining jobs belong to the same preempted allocation), or the summary
    (also into the run's cli.log)."""
    from kdrun.runtime import distributed
    from kdrun.runtime.console_log import CONSOLE_LOG, tee_console

    if results.get("finished"):
        return say_finished(results)
    if results.get("preempted"):
        if distributed.is_main():
            print(f"\nkdrun: stopped by {results['preempted']} after step {results['steps']}; "
                  f"checkpoint {results['checkpoint']}.\n  continue with trainer.resume=auto "
                  f"(and the same hydra.run.dir={results['run_dir']})", flush=True)
        raise SystemExit(results["exit_code"])
    if distributed.is_main():
        run_dir = Path(results["run_dir"])
        with tee_console(run_dir, enabled=(run_dir / CONSOLE_LOG).is_file()):
            summarise(results, sweep_dir)
    return results["final"][results["primary_metric"]]


def say_finished(results: dict) -> float | None:
    """``trainer.resume`` found a finished run: it is left as it was, and this says so. Returns the run's
    final primary metric (what a Hydra sweeper optimises), from its results.json."""
    from kdrun.runtime import distributed
    path = Path(results["results"])
    try:
        done = json.loads(path.read_text())
        value = done["final"][done["primary_metric"]]
    except (OSError, ValueError, KeyError, TypeError):
        done, value = None, None
    if distributed.is_main():
        print(f"kdrun: the run in {results['run_dir']} is finished ({results['finished']}); nothing was "
              "changed. Its results: "
              f"{path if done is not None else 'no readable results.json'}. To train it further, raise "
              "trainer.epochs (or trainer.max_steps) and resume; to start over, trainer.overwrite=true.",
              flush=True)
    return value


def multirun_dir(hydra_cfg: Any) -> str | None:
    """The sweep directory of a multirun (``-m``), ``None`` for a single run."""
    from hydra.types import RunMode

    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return str(Path(hydra_cfg.runtime.cwd) / str(hydra_cfg.sweep.dir))  # relative to where kdrun started


def summarise(results: dict, sweep_dir: str | None = None) -> None:
    """The figures a user looks for first, then where everything else is (:func:`summary_lines`)."""
    print("\n".join(summary_lines(results, sweep_dir)), flush=True)


def summary_lines(results: dict, sweep_dir: str | None = None) -> list[str]:
    """The end-of-run summary. It names the weights each figure belongs to: "final" is the last epoch's
    val (``last.pt``), "best" the best val epoch's (``best.pt``, which ``kdrun eval RUN_DIR`` picks).
    ``sweep_dir``: the sweep of a multirun, whose directory is then the TensorBoard logdir (every
    job's curves side by side)."""
    from kdrun.runtime.logger import format_metrics, format_value

    def fmt(m: dict) -> str:
        return format_metrics(m, [k for k in m if k not in ("loss", "epoch", "samples")])

    t, f, b = results.get("teacher"), results["final"], results["best"]
    key = results.get("primary_metric", "top1")
    run_dir = Path(results["run_dir"])

    has_best, has_last = (run_dir / "best.pt").is_file(), (run_dir / "last.pt").is_file()
    lines = ["", "kdrun: done."]
    if t:
        lines.append(f"  teacher  val {fmt(t)}")
    lines.append(f"  student  val {fmt(f)}   final ({'last.pt' if has_last else 'not saved'}, "
                 f"step {results['steps']})")
    at = f"step {b['step']} (epoch {b['epoch']})" if b.get("step") is not None else f"epoch {b['epoch']}"
    # what evaluate.resolve_checkpoint picks for a run dir: best.pt, else last.pt
    picks = "best.pt" if has_best else "last.pt" if has_last else None
    lines.append(f"           best {key} {format_value(b[key])} at {at} "
                 f"({'best.pt' if has_best else 'best.pt not saved'}"
                 + (f"; `kdrun eval RUN_DIR` evaluates {picks})" if picks else ")"))
    ema = results.get("ema")
    if ema:  # trainer.ema: the averaged weights, in the checkpoints beside the raw ones
        lines.append(f"  EMA      val {fmt(ema['final'])}   final; best {key} {format_value(ema['best'][key])} at "
                     f"epoch {ema['best']['epoch']} (`kdrun export --ema RUN_DIR --which last|best`)")
    skipped = int(results.get("nonfinite_skipped") or 0)
    if skipped > 0:
        lines.append(f"  skipped  {skipped} non-finite step{'s' * (skipped != 1)} (no update on them; "
                     "train/nonfinite_skipped in the curves)")
    lines.append(f"  {results['steps']} steps in {results['wall_time_s']:.1f} s, "
                 f"{results['images_per_s']:.0f} images/s")
    lines.append(f"  run dir  {run_dir}")
    if sweep_dir:
        lines.append(f"  curves   tensorboard --logdir {sweep_dir}   (every job of the sweep; this one: "
                     f"{run_dir / 'tb'})")
    else:
        lines.append(f"  curves   tensorboard --logdir {run_dir / 'tb'}")
    return lines
