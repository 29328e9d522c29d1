"""``trainer.ema`` in whole runs and through the CLI: the EMA's metrics in metrics.jsonl, results.json and the
summary, a stopped and resumed run that ends with the uninterrupted run's EMA bit for bit, a raw student
that trains exactly as without an EMA, ``kdrun export --ema``, and the refusals (one paragraph, exit 2,
nothing changed on disk)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from kdrun.config import TrainerConfig
from kdrun.engine import evaluate, make_loaders
from kdrun.runtime import checkpoint as ckpt
from tests.conftest import QUICK, compose_cfg, run

# A random small teacher (what it knows does not matter here), 2 epochs of 5 steps, augmentation on (the
# resumed run must continue the same random stream).
RUN = [*QUICK, "teacher=convnet_l", "teacher.checkpoint=null", "teacher.allow_random=true",
       "teacher.model.widths=[8,16,32]", "teacher.model.convs_per_stage=1", "distill=kl",
       "trainer.batch_size=256", "trainer.epochs=2", "trainer.deterministic=true"]
EMA = "trainer.ema={decay:0.8,warmup:true}"


def pause(at: int, marker: Path) -> list[str]:
    """A zero loss term that sends SIGTERM to this process at step ``at`` (-1: never); it changes no number."""
    return ["+distill.pause._target_=tests.distributed.helpers.PauseAt", f"+distill.pause.at={at}",
            f"+distill.pause.marker={marker}", "+distill.pause.mode=signal_self"]


def assert_equal_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_stopped_and_resumed_run_ends_with_the_uninterrupted_ema(tmp_path: Path) -> None:
    never = pause(-1, tmp_path / "never")
    full = run([*RUN, EMA, *never], tmp_path / "full")
    stopped = run([*RUN, EMA, *pause(7, tmp_path / "marker")], tmp_path / "part")  # mid epoch 2
    assert stopped["preempted"] == "SIGTERM"
    assert ckpt.load(tmp_path / "part" / "last.pt")["ema"]["updates"] == 8
    resumed = run([*RUN, EMA, *never, "trainer.resume=auto"], tmp_path / "part")

    a, b = ckpt.load(tmp_path / "full" / "last.pt"), ckpt.load(tmp_path / "part" / "last.pt")  # weights_only
    assert a["ema"]["updates"] == b["ema"]["updates"] == full["steps"] == 10
    assert_equal_states(a["ema"]["student"], b["ema"]["student"])
    assert_equal_states(a["trainable"], b["trainable"])
    assert resumed["ema"] == full["ema"] and resumed["final"] == full["final"]
    assert full["ema"]["best"]["epoch"] in (1, 2) and full["ema"]["final"]["top1"] > 0
    assert not torch.equal(a["ema"]["student"]["fc.weight"], a["student"]["fc.weight"])  # an average, not a copy

    # The EMA takes no part in training: without it the raw student is the same, bit for bit.
    plain = run([*RUN, *never], tmp_path / "plain")
    assert plain["ema"] is None and plain["final"] == full["final"]
    p = ckpt.load(tmp_path / "plain" / "last.pt")
    assert "ema" not in p
    assert_equal_states(p["trainable"], a["trainable"])

    # best.pt holds the EMA too (as it was at the raw student's best epoch).
    assert ckpt.load(tmp_path / "full" / "best.pt")["ema"]["updates"] in (5, 10)


@pytest.mark.slow
def test_quickstart_with_ema_logs_reports_and_exports_it(digits_teacher: str, tmp_path: Path,
                                                         kdrun_cli: Callable[..., tuple[int, str, str]]) -> None:
    run_dir = tmp_path / "run"
    code, out, err = kdrun_cli("train", "+recipe=quickstart", f"teacher.checkpoint={digits_teacher}",
                               "+trainer.ema.decay=0.9", "trainer.epochs=1", "logger.progress=false",
                               f"hydra.run.dir={run_dir}")
    assert code == 0, err
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (val,) = [r for r in rows if r["kind"] == "val"]
    assert {"val/ema_top1", "val/ema_top5", "val/top1"} <= set(val)
    res = json.loads((run_dir / "results.json").read_text())
    assert res["ema"]["final"]["top1"] == val["val/ema_top1"] and res["ema"]["decay"] == 0.9
    assert res["ema"]["updates"] == res["steps"] == 22
    assert "  EMA      val top1 " in out

    code, out, err = kdrun_cli("export", "--ema", str(run_dir), "--which", "last")
    assert code == 0, err
    assert "exported the student's EMA weights" in out
    sd = torch.load(run_dir / "export_ema" / "student.pth", weights_only=True)
    model = instantiate(OmegaConf.load(run_dir / "export_ema" / "student.yaml"))
    model.load_state_dict(sd)  # strict: the plain model's keys
    cfg = compose_cfg(QUICK)
    task = instantiate(cfg.task)
    t = TrainerConfig(**{k: v for k, v in OmegaConf.to_container(cfg.trainer).items() if k != "ema"})
    loaders = make_loaders(instantiate(cfg.dataset), t, 0, torch.device("cpu"), aux=False, task=task)
    metrics = evaluate(model, loaders.val, task, torch.device("cpu"))
    assert metrics["top1"] == pytest.approx(res["ema"]["final"]["top1"], abs=1e-9)
    raw = ckpt.load(run_dir / "last.pt")["student"]
    assert not all(torch.equal(v, raw[k]) for k, v in sd.items())  # the EMA, not the raw student


@pytest.mark.slow
def test_refusals_are_one_paragraph_and_change_nothing(tmp_path: Path,
                                                      kdrun_cli: Callable[..., tuple[int, str, str]]) -> None:
    run_dir = tmp_path / "run"
    run([*RUN, "trainer.max_steps=2"], run_dir)  # a run without an EMA
    before = tree_digest(tmp_path)

    code, _, err = kdrun_cli("export", "--ema", str(run_dir))
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"kdrun: error: {run_dir / 'best.pt'} holds no EMA weights: that run was trained "
                          "with trainer.ema=null. Export its raw student without --ema")

    code, _, err = kdrun_cli("train", *RUN, "trainer.max_steps=4", EMA, "trainer.resume=auto",
                             f"hydra.run.dir={run_dir}")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"checkpoint {run_dir / 'last.pt'} holds no EMA weights (that run had trainer.ema=null)" in err
    assert "Resume with trainer.ema=null" in err

    code, _, err = kdrun_cli("train", *QUICK, "trainer.ema.decay=0.9", f"hydra.run.dir={tmp_path / 'new'}")
    assert code == 2 and err.strip() == (
        "kdrun: error: trainer.ema is null or empty in this config, so trainer.ema.decay cannot be overridden: "
        "set the node as a whole, trainer.ema={decay:0.9} (trainer.ema={} for its defaults), or add the key "
        "with +trainer.ema.decay=0.9.")
    assert tree_digest(tmp_path) == before
