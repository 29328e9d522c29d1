"""The console progress (kdrun.logger.Progress, drawn by tqdm): what a log file and a terminal receive."""
from __future__ import annotations

import io
import re

from kdrun.logger import Progress


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
