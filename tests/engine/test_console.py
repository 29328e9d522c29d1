"""The training console (issue #15): what a user reads while a run trains and when it ends.

The Loop runs here with a fake step and fake val metrics (milliseconds); one short digits run checks
that the end-of-run summary, ``kdrun eval`` and the checkpoints name the same weights."""
from __future__ import annotations

import io
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from kdrun.runtime.checkpoint import TrainState
from kdrun.config import TrainerConfig
from kdrun.engine.loop import Loop
from kdrun.runtime.logger import RunLogger, console_phase

STEPS_PER_EPOCH = 7


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class FakeStep:
    """Values on every 3rd step (steps 3, 6, 9, 12: the last step 14 is not a log step)."""

    skipped = 0

    def __call__(self, batch: Any, i: int) -> SimpleNamespace:
        values = {}
        if (i + 1) % 3 == 0:
            values = {"objective/distill": torch.tensor(0.5 / (i + 1)), "objective/task": torch.tensor(1.25),
                      "loss/total": torch.tensor(1.0), "pi/distill": torch.tensor(0.5)}
        return SimpleNamespace(images=8, values=values)

    def prepare(self, batch: Any) -> Any:  # the loop's data side (KDStep.prepare), then its student side
        return batch

    def learn(self, batch: Any, i: int) -> SimpleNamespace:
        return self(batch, i)


class FakeLoaders:
    train = list(range(STEPS_PER_EPOCH))

    def start_epoch(self, epoch: int, epoch_step: int, seed: int) -> None:
        self.train = list(range(epoch_step, STEPS_PER_EPOCH))


class FakeCheckpointer:
    def __init__(self) -> None:
        self.saved: list[tuple[str, int, dict]] = []

    def save(self, name: str, st: TrainState, metrics: dict) -> None:
        self.saved.append((name, st.step, dict(metrics)))


class FakeValLoop(Loop):
    """Val top-1 = 10 × the number of steps taken, so every line says which weights it measured."""

    def validate(self, model: Any, results_name: str, precision: str | None = None) -> dict[str, float]:
        return {"top1": 10.0 * self.state.step / STEPS_PER_EPOCH, "top5": 90.0, "loss": 0.5}


def make_loop(tmp_path: Path, *, epochs: int = 2, max_steps: int = -1, progress: bool = True,
              teacher: dict | None = None) -> FakeValLoop:
    t = TrainerConfig(epochs=epochs, max_steps=max_steps, accelerator="cpu")
    total = STEPS_PER_EPOCH * epochs if max_steps < 0 else min(max_steps, STEPS_PER_EPOCH * epochs)
    task = SimpleNamespace(metric_keys=("top1", "top5", "loss"), primary_metric="top1")
    parts = SimpleNamespace(trainer=t, total_steps=total, steps_per_epoch=STEPS_PER_EPOCH, seed=0, task=task,
                            loaders=FakeLoaders(), trainable=torch.nn.Linear(1, 1), student=None, ema=None)
    st = TrainState(teacher_metrics=teacher or {})
    logger = RunLogger(tmp_path, backends=[], jsonl=False)
    return FakeValLoop(parts, FakeStep(), st, FakeCheckpointer(), logger, tmp_path, progress)  # type: ignore[arg-type]


def test_log_file_console_lines(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    loop = make_loop(tmp_path, teacher={"top1": 97.5, "top5": 100.0, "loss": 0.1})
    loop.run()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "teacher  val top1 97.50  top5 100.00  loss 0.1000"
    assert sum("teacher" in line for line in lines) == 1  # once
    val = [line for line in lines if " val " in line and not line.startswith("teacher")]
    assert val == ["epoch 1/2  val top1 10.00  top5 90.00  loss 0.5000  (best top1 10.00)",
                   "epoch 2/2  val top1 20.00  top5 90.00  loss 0.5000  (best top1 20.00)"]
    bars = [line for line in lines if "step" in line and "%" in line]
    # the bar reaches 100 % on step 14, which is not a log step, and it shows the objectives
    assert re.search(r"^100%.*\b14/14\b", bars[-1]), bars[-1]
    assert "ep 2/2 distill 0.04167 task 1.25" in bars[-1]
    assert not any("loss 1.0000" in line or "pi" in line for line in bars)  # not Σ wᵢLᵢ (= Σπ = 1 for dto_exact)
    # the epoch-1 line comes after the bar has reached the epoch's last step
    assert lines.index(val[0]) > next(i for i, line in enumerate(lines) if " 7/14 " in line)


def test_terminal_bar_reaches_the_last_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    term = FakeTerminal()
    monkeypatch.setattr("sys.stderr", term)
    make_loop(tmp_path).run()
    text = term.getvalue()
    final = text.rsplit("\r", 1)[-1]
    assert "14/14" in final and "100%" in final, final
    assert "epoch 2/2  val top1 20.00" in text


def test_teacher_fit_phase_is_labelled_and_its_end_said(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with console_phase("teacher fit"):
        make_loop(tmp_path).run()
    fit = capsys.readouterr().err.splitlines()
    assert all(line.startswith("teacher fit") for line in fit), fit  # the bar's prefix too
    assert "teacher fit  epoch 1/2  val top1 10.00  top5 90.00  loss 0.5000  (best top1 10.00)" in fit
    assert fit[-1] == "teacher fit: done after 2 epochs (14 steps); val top1 20.00  top5 90.00  loss 0.5000"
    make_loop(tmp_path / "after").run()  # the phase ended with the block
    after = capsys.readouterr().err
    assert "epoch 1/2  val" in after and "teacher fit" not in after and "done after" not in after


def test_max_steps_mid_epoch_validates_the_final_weights(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    loop = make_loop(tmp_path, max_steps=10)  # epoch 1 ends at step 7, the stop is at step 10 of 14
    loop.run()
    assert loop.last_val["top1"] == pytest.approx(100 / 7)  # step 10's weights, not epoch 1's (step 7)
    assert [h["step"] for h in loop.state.history] == [7, 10]
    name, step, metrics = loop.ckpt.saved[-1]
    assert (name, step, metrics["top1"]) == ("last.pt", 10, loop.last_val["top1"])
    err = capsys.readouterr().err
    assert "step 10 (epoch 2/2, stopped by max_steps)  val top1 14.29" in err
    assert re.search(r"^100%.*\b10/10\b", [line for line in err.splitlines() if "%" in line][-1], re.M)


def test_progress_off_prints_nothing(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    make_loop(tmp_path, progress=False, teacher={"top1": 1.0, "top5": 2.0, "loss": 0.1}).run()
    out = capfd.readouterr()
    assert out.out == "" and out.err == ""


# -- the end-of-run summary ----------------------------------------------------------------------------


def results(run_dir: Path, skipped: int = 0) -> dict:
    return {"run_dir": str(run_dir), "primary_metric": "top1", "final": {"top1": 41.5, "top5": 70.0, "loss": 2.0},
            "best": {"top1": 43.25, "top5": 71.0, "loss": 1.9, "epoch": 1, "step": 22},
            "teacher": {"top1": 97.5, "top5": 100.0, "loss": 0.1}, "steps": 44, "nonfinite_skipped": skipped,
            "wall_time_s": 1.5, "images_per_s": 2000.0}


def test_summary_names_the_weights_and_skipped_steps(tmp_path: Path) -> None:
    from kdrun.commands.train import summary_lines

    (tmp_path / "last.pt").touch()
    (tmp_path / "best.pt").touch()
    text = "\n".join(summary_lines(results(tmp_path, skipped=3)))
    assert "  teacher  val top1 97.50  top5 100.00\n" in text
    assert "  student  val top1 41.50  top5 70.00   final (last.pt, step 44)\n" in text
    assert "best top1 43.25 at step 22 (epoch 1) (best.pt; `kdrun eval RUN_DIR` evaluates best.pt)" in text
    assert "  skipped  3 non-finite steps" in text
    assert f"tensorboard --logdir {tmp_path / 'tb'}" in text
    (tmp_path / "best.pt").unlink()  # trainer.save_best=false: eval of the run dir takes last.pt
    text = "\n".join(summary_lines(results(tmp_path)))
    assert "(best.pt not saved; `kdrun eval RUN_DIR` evaluates last.pt)" in text
    assert "skipped" not in text


def test_multirun_summary_points_tensorboard_at_the_sweep(tmp_path: Path) -> None:
    from hydra.types import RunMode

    from kdrun.commands.train import multirun_dir, summary_lines

    hydra = SimpleNamespace(mode=RunMode.MULTIRUN, sweep=SimpleNamespace(dir="multirun/2026-12-01/10-00-00"),
                            runtime=SimpleNamespace(cwd=str(tmp_path)))
    sweep = multirun_dir(hydra)
    assert sweep == str(tmp_path / "multirun/2026-12-01/10-00-00")
    assert multirun_dir(SimpleNamespace(mode=RunMode.RUN, sweep=hydra.sweep, runtime=hydra.runtime)) is None
    job = Path(sweep) / "0_fixed_seed0"
    line = [x for x in summary_lines(results(job), sweep) if "tensorboard" in x][0]
    assert line.startswith(f"  curves   tensorboard --logdir {sweep}   (every job of the sweep")


# -- summary, eval and checkpoints agree (one short digits run) ---------------------------------------


def test_summary_and_eval_report_the_same_weights(tmp_path: Path) -> None:
    from kdrun.commands.train import summary_lines
    from kdrun.commands.evaluate import evaluate_checkpoint, format_summary
    from tests.conftest import QUICK, run

    # 21 steps per epoch: epoch 1 is validated at step 21, the stop at step 30 is mid-epoch 2
    res = run([*QUICK, "trainer.epochs=2", "trainer.max_steps=30"], tmp_path)
    final = evaluate_checkpoint(tmp_path / "last.pt", throughput=False)
    assert final["top1"] == pytest.approx(res["final"]["top1"], abs=1e-9)  # "final" = last.pt's weights
    assert final["checkpoint_step"] == 30 and final["checkpoint_logged"]["top1"] == pytest.approx(final["top1"])
    picked = evaluate_checkpoint(tmp_path, throughput=False)
    assert Path(picked["checkpoint"]).name == "best.pt" and picked["checkpoint_from_run_dir"]
    assert picked["top1"] == pytest.approx(res["best"]["top1"], abs=1e-9)  # "best" = best.pt's weights
    text = format_summary(picked)
    assert "  weights  best.pt (the best val epoch's weights, picked from the run dir: best.pt, else last.pt)" in text
    assert f"the run logged val top1 {picked['top1']:.2f}" in text
    assert "final (last.pt, step 30)" in "\n".join(summary_lines(res))
