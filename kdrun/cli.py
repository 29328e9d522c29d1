"""The ``kdrun`` command: one table of subcommands (:data:`COMMANDS`), each implemented in
:mod:`kdrun.commands` (train, eval, export, cache-teacher) or :mod:`kdrun.analysis` (tables, plot, tide).
``kdrun --help`` lists them; ``kdrun train --help`` lists the config groups.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Optional

# config_dir lives in kdrun.compose; tests and scripts still take it from here.
from kdrun.compose import config_dir  # noqa: F401
from kdrun.errors import fail, find_user_error, full_traceback_requested, report


def run_train(argv: list[str]) -> None:
    from kdrun.commands.train import run_train as train_main

    train_main(argv)


def run_eval(argv: list[str]) -> None:
    from kdrun.commands.evaluate import main as eval_main

    eval_main(argv)


def run_export(argv: list[str]) -> int:
    from kdrun.commands.export import main as export_main

    return export_main(argv)


def run_tables(argv: list[str]) -> int:
    from kdrun.analysis.tables import main as tables_main

    return tables_main(argv)


def run_plot(argv: list[str]) -> int:
    from kdrun.analysis.plot import main as plot_main

    return plot_main(argv)


def run_tide(argv: list[str]) -> int:
    from kdrun.analysis.tide import main_run_dir

    try:
        return main_run_dir(argv)
    except FileNotFoundError as e:  # a run dir without saved detections / ground truth: say which file
        fail(str(e))


@dataclass(frozen=True)
class Command:
    """One ``kdrun`` subcommand: what runs it (``argv`` after the name → exit status, ``None`` = 0) and
    its lines in ``kdrun --help``."""

    run: Callable[[list[str]], Optional[int]]
    help: str


def run_cache_teacher(argv: list[str]) -> int:
    from kdrun.commands.cache_teacher import main as cache_main

    return cache_main(argv)


COMMANDS: dict[str, Command] = {
    "train": Command(run_train, "train/distil a model: kdrun train [group=option ...] [key=value ...] [+recipe=NAME]\n"
                                "(kdrun train --help lists the config groups and options)"),
    "eval": Command(run_eval, "val metrics, params, images/s of a checkpoint: kdrun eval RUN_DIR|CHECKPOINT "
                              "[key=value ...]"),
    "export": Command(run_export, "the student alone as a plain state_dict: kdrun export RUN_DIR"),
    "tables": Command(run_tables, "the papers' tables from run dirs: kdrun tables --table cifar100 RUNS_DIR..."),
    "plot": Command(run_plot, "conflict/dominance/pi/accuracy figures: kdrun plot RUN_DIR..."),
    "tide": Command(run_tide, "TIDE error analysis of a detection run: kdrun tide RUN_DIR"),
    "cache-teacher": Command(run_cache_teacher, "fill or check the teacher-output cache of a training config:\n"
                                                "kdrun cache-teacher [the run's overrides, e.g. +recipe=NAME]"),
}


def usage() -> str:
    lines = [f"usage: kdrun {{{','.join(COMMANDS)}}} ...", ""]
    for name, command in COMMANDS.items():
        first, *more = command.help.split("\n")
        lines += [f"  {name:<13} {first}", *(f"  {'':<13} {line}" for line in more)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    command = COMMANDS.get(name)
    if command is None:
        fail(f"unknown command '{name}'; valid commands are {', '.join(COMMANDS)}.")
    try:
        status = command.run(rest)
    except KeyboardInterrupt:
        # Ctrl-C outside the training loop (whose stop handler checkpoints instead), mostly in the first
        # seconds, while torch and Hydra import: the shell's exit status for SIGINT, no traceback.
        if full_traceback_requested():
            raise
        print("kdrun: interrupted (Ctrl-C).", file=sys.stderr, flush=True)
        sys.exit(130)
    except Exception as e:  # a user error, also one wrapped by instantiate: one paragraph, exit 2
        user = find_user_error(e)
        if user is None:
            raise
        report(user)
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
