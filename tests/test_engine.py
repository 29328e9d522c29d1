"""End-to-end runs on digits: KD beats chance and matches no-KD, logs, resume, eval, multirun."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdrun.runtime import checkpoint as ckpt
from kdrun.commands.evaluate import evaluate_checkpoint
from tests.conftest import QUICK, event_scalars, run


def kd(teacher: str, *extra: str) -> list[str]:
    return ["teacher=convnet_l", f"teacher.checkpoint={teacher}", "distill=kl",
            "balancer.alpha_task=1.0", "balancer.alpha_distill=1.0", *QUICK, *extra]


@pytest.mark.slow
def test_kd_run_learns_and_logs_every_diagnostic(digits_teacher: str, tmp_path: Path) -> None:
    res = run(kd(digits_teacher, "trainer.epochs=3", "seed=1"), tmp_path / "kd")
    base = run([*QUICK, "trainer.epochs=3", "seed=1"], tmp_path / "nokd")
    assert res["teacher"]["top1"] > 80.0
    assert res["final"]["top1"] > 50.0  # chance is 10 %
    assert res["final"]["top1"] >= base["final"]["top1"] - 3.0
    assert res["steps"] == 3 * (1438 // 64)

    scalars = event_scalars(tmp_path / "kd")
    for tag in ("loss/ce", "loss/kl", "loss/total", "objective/task", "objective/distill", "pi/task",
                "pi/distill", "grad/conflict", "grad/cosine", "grad/dominance", "grad/log10_dominance",
                "grad/norm/task", "grad/norm/distill", "grad/update_norm", "grad/combined_norm", "lr",
                "train/images_per_s", "val/top1", "val/top5", "teacher/val_top1"):
        assert tag in scalars, tag
        assert all(math.isfinite(v) for _, v in scalars[tag]), tag
    assert scalars["pi/task"][0][1] == pytest.approx(1.0)
    # cosine is conflict / (‖g_d‖ ‖g_t‖) at the same step
    (step, cos), = scalars["grad/cosine"][:1]
    conflict = dict(scalars["grad/conflict"])[step]
    nd, nt = dict(scalars["grad/norm/distill"])[step], dict(scalars["grad/norm/task"])[step]
    assert cos == pytest.approx(conflict / (nd * nt), rel=1e-4)
    assert dict(scalars["grad/dominance"])[step] == pytest.approx(nd / nt, rel=1e-4)

    lines = [json.loads(l) for l in (tmp_path / "kd" / "metrics.jsonl").read_text().splitlines()]
    assert {l["kind"] for l in lines} >= {"train", "val", "teacher"}
    results = json.loads((tmp_path / "kd" / "results.json").read_text())
    for key in ("config", "final", "best", "epochs", "steps", "wall_time_s", "images_per_s", "git_commit"):
        assert key in results
    assert results["config"]["distill"]["kl"]["temperature"] == 4.0


@pytest.mark.slow
def test_resume_continues_bit_identically(digits_teacher: str, tmp_path: Path) -> None:
    common = kd(digits_teacher, "trainer.epochs=2", "trainer.deterministic=true", "seed=3")
    full = run(common, tmp_path / "full")
    steps_per_epoch = full["steps"] // 2
    part = run([*common, f"trainer.max_steps={steps_per_epoch}"], tmp_path / "part")
    assert part["epochs"] == 1
    resumed = run([*common, "trainer.resume=auto"], tmp_path / "part")
    assert resumed["steps"] == full["steps"]
    a, b = ckpt.load(tmp_path / "full" / "last.pt"), ckpt.load(tmp_path / "part" / "last.pt")
    for k, v in a["trainable"].items():
        assert torch.equal(v, b["trainable"][k]), k
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for i, s in a["optimizer"]["state"].items():
        assert torch.equal(s["momentum_buffer"], b["optimizer"]["state"][i]["momentum_buffer"])
    assert resumed["final"]["top1"] == full["final"]["top1"]


@pytest.mark.slow
def test_eval_reproduces_logged_top1(digits_teacher: str, tmp_path: Path) -> None:
    res = run(kd(digits_teacher, "trainer.epochs=2"), tmp_path)
    last = evaluate_checkpoint(tmp_path / "last.pt")
    assert last["top1"] == pytest.approx(res["final"]["top1"], abs=1e-9)
    assert last["samples"] == 359
    best = evaluate_checkpoint(tmp_path)  # a run dir means best.pt
    assert best["top1"] == pytest.approx(res["best"]["top1"], abs=1e-9)
    out = subprocess.run([sys.executable, "-m", "kdrun.cli", "eval", str(tmp_path / "last.pt"), "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["top1"] == pytest.approx(res["final"]["top1"], abs=1e-9)


@pytest.mark.slow
def test_nonfinite_step_is_skipped_and_changes_nothing(digits_teacher: str, tmp_path: Path) -> None:
    over = kd(digits_teacher, "+distill.nan._target_=tests.helpers.NaNAt", "+distill.nan.at=[3]",
              "trainer.max_steps=3", "trainer.epochs=1", "trainer.deterministic=true")
    run(over, tmp_path / "a")  # steps 0..2 (all finite)
    res = run([*over[:-2], "trainer.max_steps=4", "trainer.epochs=1", "trainer.deterministic=true"],
              tmp_path / "b")  # step 3 is NaN
    assert res["nonfinite_skipped"] == 1
    a, b = ckpt.load(tmp_path / "a" / "last.pt"), ckpt.load(tmp_path / "b" / "last.pt")
    for k, v in a["trainable"].items():
        if "running" in k or "num_batches" in k:
            continue  # the forward of the skipped step updated BatchNorm statistics, as any forward does
        assert torch.equal(v, b["trainable"][k]), k
    for i, s in a["optimizer"]["state"].items():
        assert torch.equal(s["momentum_buffer"], b["optimizer"]["state"][i]["momentum_buffer"])
    assert a["balancer"].keys() == b["balancer"].keys()


@pytest.mark.slow
def test_multirun_sweep_makes_one_directory_per_job(tmp_path: Path) -> None:
    env = dict(os.environ)
    out = subprocess.run(
        [sys.executable, "-m", "kdrun.cli", "train", "-m", "balancer.alpha_task=0.5,1.0", *QUICK,
         "trainer.max_steps=2", "trainer.epochs=1", f"hydra.sweep.dir={tmp_path}"],
        capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    dirs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and (p / "results.json").is_file())
    assert len(dirs) == 2
    alphas = sorted(json.loads((d / "results.json").read_text())["config"]["balancer"]["alpha_task"] for d in dirs)
    assert alphas == [0.5, 1.0]


@pytest.mark.slow
def test_quickstart_cli_prints_the_figures(tmp_path: Path) -> None:
    env = dict(os.environ, KDRUN_CACHE=str(tmp_path / "cache"))
    out = subprocess.run(
        [sys.executable, "-m", "kdrun.cli", "train", "+recipe=quickstart", "trainer.epochs=1",
         "teacher.fit_if_missing_epochs=1", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "cache" / "teachers" / "digits_convnet_l.pt").is_file()
    assert "teacher  val top1" in out.stdout and "student  val top1" in out.stdout
    assert f"tensorboard --logdir {tmp_path / 'run' / 'tb'}" in out.stdout
    # cli.log holds the run's console: the val lines (stderr), the summary (stdout), not the bar's redraws
    log = (tmp_path / "run" / "cli.log").read_text()
    assert "epoch 1/1  val top1" in log and "student  val top1" in log and "kdrun: done." in log
    assert "\r" not in log
