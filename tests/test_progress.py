"""The console progress (kdrun.runtime.logger.Progress, drawn by tqdm): what a log file and a terminal receive."""
from __future__ import annotations

import io
import re

from kdrun.runtime.logger import Progress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_without_a_terminal_a_line_every_tenth() -> None:
    out = io.StringIO()
    p = Progress(100, enabled=True, stream=out)
    for step in range(1, 101):
        p.update(step, f"ep 1/1 loss {1 / step:.4f}")
    p.close()
    lines = out.getvalue().splitlines()
    # The first update, then 10 %, 20 %, ... 100 %: 11 lines for 100 steps, no carriage returns.
    assert len(lines) == 11, lines
    assert "\r" not in out.getvalue()
    steps = [int(re.search(r"(\d+)/100", line).group(1)) for line in lines]
    assert steps == [1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert lines[-1].startswith("100%") and lines[-1].endswith("ep 1/1 loss 0.0100]")
    assert all(line.isascii() for line in lines)  # log files need not be UTF-8


def test_a_resumed_run_starts_at_its_step() -> None:
    out = io.StringIO()
    p = Progress(100, enabled=True, stream=out)
    for step in range(61, 101):
        p.update(step, "x")
    lines = out.getvalue().splitlines()
    assert [int(re.search(r"(\d+)/100", line).group(1)) for line in lines] == [61, 70, 80, 90, 100]


def test_sparse_updates_and_write() -> None:
    out = io.StringIO()
    p = Progress(1000, enabled=True, stream=out)
    for step in range(50, 1001, 50):  # updates on log steps only (every 50 steps)
        p.update(step, "")
        if step % 500 == 0:
            p.write(f"epoch {step // 500}: val top1 12.5")
    lines = out.getvalue().splitlines()
    assert lines.count("epoch 1: val top1 12.5") == 1 and lines[-1] == "epoch 2: val top1 12.5"
    assert len(lines) == 11 + 2  # 50 (0 %), 100, 200, ... 1000


def test_disabled_prints_nothing() -> None:
    out = FakeTerminal()
    p = Progress(10, enabled=False, stream=out)
    p.update(5, "x")
    p.write("line")
    p.close()
    assert out.getvalue() == ""


def test_on_a_terminal_one_live_bar() -> None:
    out = FakeTerminal()
    p = Progress(100, enabled=True, stream=out)
    for step in range(1, 101):
        p.update(step, "loss 0.5")
        if step == 50:
            p.write("epoch 1: val top1 10.0")
    p.close()
    text = out.getvalue()
    assert "\r" in text  # redrawn in place, not a line per update
    assert text.count("\n") == 2  # the written line and the bar's final newline
    assert "epoch 1: val top1 10.0\n" in text
    assert "100/100" in text.rsplit("\r", 1)[-1] and "loss 0.5" in text


def test_finish_shows_the_last_step_when_it_is_not_a_log_step() -> None:
    out = io.StringIO()
    p = Progress(103, enabled=True, stream=out)
    for step in range(10, 101, 10):  # log steps 10 … 100; the run ends at 103
        p.update(step, f"task {step}")
    p.finish(103)
    p.finish(103)  # already shown: nothing more
    lines = out.getvalue().splitlines()
    assert lines[-1].startswith("100%") and "103/103" in lines[-1] and lines[-1].endswith("task 100]")
    assert sum("103/103" in line for line in lines) == 1
    term = FakeTerminal()
    p = Progress(103, enabled=True, stream=term)
    p.update(100, "x")
    p.finish(103)
    p.close()
    assert "103/103" in term.getvalue().rsplit("\r", 1)[-1]


def test_label_prefixes_the_bar_and_defaults_to_the_phase() -> None:
    from kdrun.runtime.logger import console_phase, current_phase

    out = io.StringIO()
    with console_phase("teacher fit"):
        assert current_phase() == "teacher fit"
        p = Progress(10, enabled=True, stream=out)
    assert current_phase() is None
    p.update(10, "task 0.1")
    assert out.getvalue().startswith("teacher fit: 100%")
    term = FakeTerminal()
    p = Progress(10, enabled=True, stream=term, label="teacher fit")
    p.update(5, "")
    p.close()
    assert "teacher fit:  50%" in term.getvalue()


def test_metric_formatting() -> None:
    from kdrun.runtime.logger import format_metrics, format_value

    assert format_value(45.2123) == "45.21" and format_value(0.41237) == "0.4124" and format_value(-1.0) == "-1.00"
    assert format_value(float("nan")) == "nan"
    assert format_metrics({"top5": 90.0, "top1": 45.0, "loss": 0.5}, ["top1", "top5", "missing"]) == "top1 45.00  top5 90.00"
