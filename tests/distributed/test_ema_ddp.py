"""The student's EMA under DDP: every rank updates its own from the student's weights, which DDP keeps
equal, so the EMAs are bit-identical on both ranks; and 2 processes × batch B average the same weights as
1 process × batch 2B (the BatchNorm-free equivalence run, kdrun.engine.ema)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdrun.runtime import checkpoint as ckpt
from tests.conftest import run
from tests.distributed.conftest import EQ_BATCH, EQ_EMA, EQ_STEPS, EQUIV, assert_identical


def test_ema_is_the_same_on_both_ranks_and_matches_one_process(two_proc: dict[str, Path], tmp_path: Path) -> None:
    two = two_proc["eq_ema"]
    r0, r1 = torch.load(two / "rank0_ema.pt"), torch.load(two / "rank1_ema.pt")
    assert_identical(r0, r1)
    saved = ckpt.load(two / "last.pt")["ema"]
    assert saved["updates"] == EQ_STEPS
    assert_identical(saved["student"], r0)

    one = run([*EQUIV, "balancer=fixed", EQ_EMA, f"trainer.batch_size={2 * EQ_BATCH}"], tmp_path)
    ref = ckpt.load(tmp_path / "last.pt")["ema"]["student"]
    worst = max((r0[k] - v).abs().max().item() for k, v in ref.items())
    assert worst < 1e-5, f"max |Δ EMA| = {worst:.3g}"
    res = json.loads((two / "results.json").read_text())
    assert res["ema"]["updates"] == one["ema"]["updates"] == EQ_STEPS
    # every val sample once over the two ranks, as the raw student's: at most one sample apart
    assert res["ema"]["final"]["top1"] == pytest.approx(one["ema"]["final"]["top1"], abs=100 / 359 + 1e-9)
