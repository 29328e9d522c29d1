"""The errors kdrun reports to the user as one paragraph (exit status 2) instead of a traceback.

Both the CLI (:mod:`kdrun.cli`) and the worker processes of a local multi-process run
(:mod:`kdrun.launch`) report the same errors, so the list lives here, below both of them (launch.py used to
import it from cli.py, which imports launch.py).

A user error raised inside ``hydra.utils.instantiate`` reaches the caller wrapped in Hydra's
``InstantiationException`` ("Error in call to target '...':\\nDatasetError('...')", the message repr'd);
:func:`find_user_error` walks the exception chain back to the original, whose own message is the one to show.
"""
from __future__ import annotations

import os
import sys
from typing import NoReturn, Optional


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

    ``full_traceback`` overrides the environment (the CLI reads it before it sets the variable for Hydra)."""
    if full_traceback_requested() if full_traceback is None else full_traceback:
        raise e
    fail(str(e))
