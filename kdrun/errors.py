"""The errors kdrun reports to the user as one paragraph (exit status 2) instead of a traceback.

Both the CLI (:mod:`kdrun.cli`) and the worker processes of a local multi-process run
(:mod:`kdrun.commands.launch`) report the same errors, so the list lives here, below both of them (launch.py used to
import it from cli.py, which imports launch.py).

A user error raised inside ``hydra.utils.instantiate`` reaches the caller wrapped in Hydra's
``InstantiationException`` ("Error in call to target '...':\\nDatasetError('...')", the message repr'd);
:func:`find_user_error` walks the exception chain back to the original, whose own message is the one to show.
"""
from __future__ import annotations

import difflib
import os
import re
import sys
from typing import NoReturn, Optional, Sequence


class NonFiniteError(FloatingPointError):
    """Training stopped on non-finite values: ``trainer.nonfinite=raise``, or every one of the last
    ``trainer.max_nonfinite_streak`` steps was skipped (a run that learns nothing must not end "done").
    Defined here, not with the step, so that this list names it without importing torch."""


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types whose message is meant for the user verbatim.

    Imported on call: the data, model and balancer packages import torch, which ``kdrun --help`` and
    ``kdrun tables`` do not need."""
    from kdrun.balancers.base import BalancerConfigError
    from kdrun.config import ConfigError
    from kdrun.data.base import DatasetError
    from kdrun.models.build import CheckpointError
    from kdrun.models.taps import TapError
    from kdrun.projectors.identity import ProjectorDimError

    return (ConfigError, DatasetError, CheckpointError, TapError, BalancerConfigError, ProjectorDimError,
            NonFiniteError)


def find_user_error(e: BaseException) -> Optional[BaseException]:
    """``e`` itself or the first user error in its chain of causes (``raise ... from``) and contexts."""
    kinds, seen = user_errors(), set()
    cur: Optional[BaseException] = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, kinds):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ if cur.__cause__ is not None else (
            None if cur.__suppress_context__ else cur.__context__)
    return None


def full_traceback_requested() -> bool:
    """``HYDRA_FULL_ERROR=1``: the user wants tracebacks (Hydra's own switch, so one switch for both)."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def fail(message: str, prefix: str = "kdrun: error") -> NoReturn:
    """Print one paragraph to stderr and exit with status 2 (a usage error, as argparse does)."""
    print(f"{prefix}: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def report(e: BaseException, full_traceback: Optional[bool] = None) -> NoReturn:
    """One paragraph for a user error; re-raised (traceback) with HYDRA_FULL_ERROR=1.

    ``full_traceback`` overrides the environment (the CLI reads it before it sets the variable for Hydra).
    Inside a sweep (``-m``) the advice to choose another ``hydra.run.dir`` names ``hydra.sweep.dir``."""
    if full_traceback_requested() if full_traceback is None else full_traceback:
        raise e
    message = str(e)
    fail(for_sweep(message) if in_sweep() else message)


# "choose another hydra.run.dir": the setting to change. Not "hydra.run.dir=PATH", which is a command that
# continues one job of a sweep on its own and stays right.
_RUN_DIR_ADVICE = re.compile(r"\bhydra\.run\.dir\b(?!=)")


def for_sweep(message: str) -> str:
    """A run-directory message as a sweep's job reads it: the engine words its refusals for a single run
    (:mod:`kdrun.runtime.rundir`), but a job's directory is ``hydra.sweep.dir``/``hydra.sweep.subdir``, and
    ``hydra.run.dir`` does nothing under ``-m``."""
    return _RUN_DIR_ADVICE.sub("hydra.sweep.dir", message)


def in_sweep() -> bool:
    """Whether this process runs a job of a Hydra multirun (asked while the job runs: Hydra's config is
    set then). Hydra is imported only if it already is: ``kdrun eval``/``tables`` never start it."""
    if "hydra.core.hydra_config" not in sys.modules:
        return False
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # a half-set Hydra config: no sweep to speak of
        return False


# More options than this are not listed in a message: `kdrun train --help` lists them (the recipe group
# has about 200).
LIST_AT_MOST = 12


def close_options(name: str, options: Sequence[str], most: int = 5) -> list[str]:
    """The options a misspelt ``name`` most likely meant: difflib's close matches, else the options that
    contain it (``+recipe=resnet20`` → every recipe with that student)."""
    close = difflib.get_close_matches(name, options, n=most, cutoff=0.6)
    if not close:
        close = difflib.get_close_matches(name.lower(), [o.lower() for o in options], n=most, cutoff=0.6)
        close = [o for o in options if o.lower() in close]
    if not close and len(name) >= 3:
        close = [o for o in options if name.lower() in o.lower()][:most]
    return close


def missing_option_message(e: BaseException) -> Optional[str]:
    """Hydra's "Could not find 'group/option'" prints every option of the group (about 200 recipes) and its
    search path; say the option does not exist, the close matches first, and where the full list is.
    ``None`` when ``e`` is not that error."""
    missing = getattr(e, "missing_cfg_file", None)
    options = list(getattr(e, "options", None) or [])
    if not missing or not options or "Could not find" not in str(e):
        return None
    group, _, name = str(missing).rpartition("/")
    if not group:
        return None
    close = close_options(name, options)
    guess = (f" (did you mean {' or '.join(close)}?)" if len(close) <= 2 else
             f" (did you mean {', '.join(close[:-1])} or {close[-1]}?)") if close else " (no option is close to it)"
    listing = (f"The options are {', '.join(options)}." if len(options) <= LIST_AT_MOST else
               f"`kdrun train --help` lists all {len(options)} options of {group} (and of every other group).")
    return f"the config group {group} has no option '{name}'{guess}. {listing}"
