"""The ``kdrun`` command: ``train`` (Hydra), ``eval``.

``kdrun train [overrides]`` is a Hydra application over ``conf/`` (``+recipe=NAME`` adds
``recipes/NAME.yaml``); ``kdrun eval CHECKPOINT [key=value ...]`` evaluates a checkpoint with the
config stored in it (overrides such as ``dataset.root=...`` adjust it): val metrics, parameter count
and inference images/s (``--json`` for one JSON object).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from kdrun.config import ConfigError

COMMANDS = ("train", "eval", "export", "tables", "plot", "tide")


def config_dir() -> Path:
    """``conf/`` beside the package (editable install or source checkout)."""
    here = Path(__file__).resolve().parent
    env = os.environ.get("KDRUN_CONFIG_DIR")
    for cand in ([Path(env)] if env else []) + [here.parent / "conf", here / "conf"]:
        if (cand / "config.yaml").is_file():
            return cand
    raise SystemExit("kdrun: cannot find the config directory (conf/) beside the package; install kdrun "
                     "from a source checkout with `pip install -e .` or set KDRUN_CONFIG_DIR.")


def _user_errors() -> tuple[type[BaseException], ...]:
    from kdrun.balancers.base import BalancerConfigError
    from kdrun.data.base import DatasetError
    from kdrun.models.build import CheckpointError
    from kdrun.models.taps import TapError
    from kdrun.projectors.identity import ProjectorDimError

    return (ConfigError, DatasetError, CheckpointError, TapError, BalancerConfigError, ProjectorDimError)


def report(e: BaseException) -> None:
    """One paragraph for a user error; the traceback only with HYDRA_FULL_ERROR=1."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise e
    print(f"kdrun: error: {e}", file=sys.stderr)
    sys.exit(2)


def run_train(argv: list[str]) -> None:
    """``kdrun train``: one process, N local workers (``trainer.devices=N``), or one rank of a job that
    torchrun/srun started (then every rank runs this; see :func:`kdrun.distributed.launch_env`)."""
    import shutil
    import tempfile

    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    from kdrun import distributed as D

    try:
        env = D.launch_env()
    except ConfigError as e:
        report(e)
        return
    joined = env is not None and env.world_size > 1
    scratch: str | None = None
    if joined and env is not None and env.rank != 0:
        # Every rank runs Hydra, but only rank 0's output directory is the run directory (it is
        # broadcast below). The other ranks' Hydra writes into a scratch directory that is removed at
        # exit, so no per-rank ${now:...} directories appear beside the run.
        scratch = tempfile.mkdtemp(prefix=f"kdrun-rank{env.rank}-")
        argv = [*argv, f"hydra.run.dir={scratch}/run", f"hydra.sweep.dir={scratch}/sweep",
                "hydra.output_subdir=null"]

    @hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
    def _main(cfg: DictConfig) -> float | None:
        import copy

        from omegaconf import OmegaConf

        from kdrun.config import TrainerConfig, validate
        from kdrun.engine import train
        from kdrun.launch import WorkerFailed, check_devices, launch_train, resolve_devices

        try:
            run_dir = Path(HydraConfig.get().runtime.output_dir)
            checked = copy.deepcopy(cfg)
            validate(checked)  # fail before any process starts
            t = TrainerConfig(**OmegaConf.to_container(checked.trainer, resolve=True))
            # Read the environment here, not before Hydra: under hydra/launcher=submitit_slurm this
            # function runs in each SLURM task on the compute nodes, not in the submitting process.
            job_env = D.launch_env()
            if job_env is not None and job_env.world_size > 1:
                check_devices(t.devices)  # the value must be valid, but the launcher decided the count
                D.init_process_group(D.device_type(t.accelerator), job_env)  # once per process
                run_dir = Path(D.broadcast_object(str(run_dir)))
                if D.is_main() and t.devices not in (1, "auto", job_env.local_world_size):
                    print(f"[kdrun] note: trainer.devices={t.devices} is ignored: {job_env.source} started "
                          f"{job_env.world_size} processes, and kdrun joins them.", file=sys.stderr, flush=True)
                results = train(cfg, run_dir)
            else:
                dev, nproc = resolve_devices(t.accelerator, t.devices)
                if nproc > 1:
                    results = launch_train(checked, run_dir, nproc, dev, t.preempt_signals, t.preempt_grace_s)
                else:
                    results = train(cfg, run_dir)
        except _user_errors() as e:
            report(e)
            return None
        except WorkerFailed as e:
            if str(e):
                print(f"kdrun: error: {e}", file=sys.stderr, flush=True)
            sys.exit(e.exit_code)
        if results.get("preempted"):
            # An orderly stop: the checkpoint is written. Exiting here (not returning) also ends a
            # multirun sweep, whose remaining jobs belong to the same preempted allocation.
            if D.is_main():
                print(f"\nkdrun: stopped by {results['preempted']} after step {results['steps']}; "
                      f"checkpoint {results['checkpoint']}.\n  continue with trainer.resume=auto "
                      f"(and the same hydra.run.dir={results['run_dir']})", flush=True)
            raise SystemExit(results["exit_code"])
        if D.is_main():
            summarise(results)
        return results["final"][results["primary_metric"]]

    sys.argv = ["kdrun train", *argv]
    try:
        _main()
    finally:
        D.destroy_process_group()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def summarise(results: dict) -> None:
    """The figures a user looks for first, then where everything else is."""
    def fmt(m: dict) -> str:
        return "   ".join(f"{k} {v:6.2f}" for k, v in m.items() if k not in ("loss", "epoch", "samples"))

    t, f, b = results.get("teacher"), results["final"], results["best"]
    key = results.get("primary_metric", "top1")
    lines = ["", "kdrun: done."]
    if t:
        lines.append(f"  teacher  val {fmt(t)}")
    lines.append(f"  student  val {fmt(f)}   (best {key} {b[key]:.2f} at epoch {b['epoch']})")
    lines.append(f"  {results['steps']} steps in {results['wall_time_s']:.1f} s, "
                 f"{results['images_per_s']:.0f} images/s")
    lines.append(f"  run dir  {results['run_dir']}")
    lines.append(f"  curves   tensorboard --logdir {Path(results['run_dir']) / 'tb'}")
    print("\n".join(lines), flush=True)


def run_eval(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="kdrun eval", description="Evaluate a kdrun checkpoint on its data set's val "
                                "split, with the config stored in the checkpoint: the task's metrics (top-1/top-5, "
                                "or COCO AP/AP50/AP75/APs/APm/APl), the student's parameter count and its "
                                "inference throughput (forward + post-processing, data loading excluded).")
    p.add_argument("checkpoint", help="last.pt, best.pt or a run directory (uses best.pt, else last.pt)")
    p.add_argument("overrides", nargs="*", help="key=value changes to the stored config, e.g. dataset.root=/data")
    p.add_argument("--device", default=None, help="cpu | cuda (default: the stored trainer.accelerator)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--no-throughput", action="store_true", help="skip the throughput pass")
    p.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help="batch size of the throughput pass (default: the val loader's; the metrics pass always "
                        "uses the stored trainer.val_batch_size)")
    p.add_argument("--warmup", type=int, default=5, metavar="N", help="warm-up batches not timed (default 5)")
    p.add_argument("--max-batches", type=int, default=None, metavar="N",
                   help="time at most N batches (default: one pass over the val split)")
    p.add_argument("--save-detections", default=None, metavar="PATH",
                   help="detection: write the val detections (COCO results json) to PATH")
    a = p.parse_args(argv)
    if a.warmup < 0 or (a.batch_size is not None and a.batch_size < 1) or (a.max_batches is not None
                                                                           and a.max_batches < 1):
        p.error("--warmup must be >= 0, --batch-size and --max-batches >= 1")
    try:
        from kdrun.evaluate import evaluate_checkpoint, format_summary

        metrics = evaluate_checkpoint(a.checkpoint, a.overrides, a.device, throughput=not a.no_throughput,
                                      warmup_batches=a.warmup, max_batches=a.max_batches,
                                      throughput_batch_size=a.batch_size, detections_path=a.save_detections)
    except _user_errors() as e:
        report(e)
        return
    if a.json:
        print(json.dumps(metrics))
    else:
        print(format_summary(metrics))


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: kdrun {train,eval,export,tables,plot,tide} ...\n\n"
              "  train   train/distil a model: kdrun train [group=option ...] [key=value ...] [+recipe=NAME]\n"
              "          (kdrun train --help lists the config groups and options)\n"
              "  eval    val metrics, params, images/s of a checkpoint: kdrun eval RUN_DIR|CHECKPOINT [key=value ...]\n"
              "  export  the student alone as a plain state_dict: kdrun export RUN_DIR\n"
              "  tables  the papers' tables from run dirs: kdrun tables --table cifar100 RUNS_DIR...\n"
              "  plot    conflict/dominance/pi/accuracy figures: kdrun plot RUN_DIR...\n"
              "  tide    TIDE error analysis of a detection run: kdrun tide RUN_DIR")
        sys.exit(0 if argv else 2)
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        run_train(rest)
    elif cmd == "eval":
        run_eval(rest)
    elif cmd == "tide":
        from kdrun.tide import main_run_dir

        try:
            sys.exit(main_run_dir(rest))
        except (FileNotFoundError, *_user_errors()) as e:
            report(e)
    elif cmd in ("export", "tables", "plot"):
        import importlib

        module = importlib.import_module(f"kdrun.{cmd}")
        try:
            sys.exit(module.main(rest))
        except _user_errors() as e:
            report(e)
    else:
        print(f"kdrun: unknown command '{cmd}'; valid commands are {', '.join(COMMANDS)}.", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
