"""cli.log: kdrun's copy of the console (kdrun.runtime.console_log)."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from kdrun.runtime.console_log import CONSOLE_LOG, ConsoleHandler, tee_console


def test_both_streams_are_copied_and_restored(tmp_path: Path) -> None:
    before = sys.stdout, sys.stderr
    with tee_console(tmp_path):
        print("to stdout")
        print("to stderr", file=sys.stderr)
    assert (sys.stdout, sys.stderr) == before
    print("after the block")
    assert (tmp_path / CONSOLE_LOG).read_text().splitlines() == ["to stdout", "to stderr"]


def test_a_redrawn_line_keeps_its_final_text(tmp_path: Path) -> None:
    with tee_console(tmp_path):
        sys.stderr.write("\r 10%|#  | 1/10")
        sys.stderr.write("\r 50%|## | 5/10")
        sys.stderr.write("\r100%|###| 10/10\n")
        sys.stderr.write("unterminated")
    assert (tmp_path / CONSOLE_LOG).read_text() == "100%|###| 10/10\nunterminated\n"


def test_a_resumed_session_appends_and_a_disabled_rank_writes_nothing(tmp_path: Path) -> None:
    with tee_console(tmp_path):
        print("session 1")
    with tee_console(tmp_path):
        print("session 2")
    with tee_console(tmp_path / "other", enabled=False):
        print("rank 1")
    assert (tmp_path / CONSOLE_LOG).read_text() == "session 1\nsession 2\n"
    assert not (tmp_path / "other").exists()


def test_logging_records_reach_the_log_through_the_current_stdout(tmp_path: Path) -> None:
    """Hydra configures logging before the run directory exists: the handler must follow sys.stdout."""
    log = logging.getLogger("kdrun.test_console_log")
    handler = ConsoleHandler()
    log.addHandler(handler)
    log.propagate = False
    try:
        with tee_console(tmp_path):
            log.warning("a library's warning")
    finally:
        log.removeHandler(handler)
    assert (tmp_path / CONSOLE_LOG).read_text() == "a library's warning\n"
