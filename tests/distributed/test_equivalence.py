"""DDP is exact: 2 processes × batch B train the same parameters as 1 process × batch 2B.

For a loss-level balancer (fixed, amortised DTO) this is DDP's gradient averaging; for gradient-level
ones (exact DTO, cross-batch, MGDA, and DOT, whose momentum buffers are fed from it) it is the rank-averaged
Jacobian and the rank-averaged losses.
The TrainSampler gives rank r the permutation's positions r, r+2, …, so the two ranks' k-th batches
together are exactly positions [2kB, 2(k+1)B) of the same permutation: the single process's k-th
batch of 2B (checked directly below). Every rank must also compute the same π at every step.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdrun.runtime import distributed as D
from tests.conftest import run
from tests.distributed.conftest import BALANCERS, EQ_BATCH, EQ_STEPS, EQUIV, WITH, trainable


def test_rank_batches_union_is_the_single_process_batch() -> None:
    n, b = 1438, EQ_BATCH
    one = list(D.TrainSampler(n, seed=3, num_replicas=1, rank_=0))
    ranks = [list(D.TrainSampler(n, seed=3, num_replicas=2, rank_=r)) for r in range(2)]
    for k in range(len(ranks[0]) // b):
        union = sorted(ranks[0][k * b:(k + 1) * b] + ranks[1][k * b:(k + 1) * b])
        assert union == sorted(one[k * 2 * b:(k + 1) * 2 * b])
    # ...and the resume offset keeps it: skipping k batches on each rank = skipping k batches of 2B.
    s = D.TrainSampler(n, seed=3, num_replicas=2, rank_=1)
    s.set_epoch(0, skip=5 * b)
    assert list(s) == ranks[1][5 * b:]


@pytest.mark.parametrize("balancer", BALANCERS)
def test_two_processes_match_one_process_with_twice_the_batch(
        balancer: str, two_proc: dict[str, Path], tmp_path: Path) -> None:
    two = two_proc[f"eq/{balancer}"]
    one = run([*EQUIV, f"balancer={balancer}", *WITH.get(balancer, []), f"trainer.batch_size={2 * EQ_BATCH}"],
              tmp_path)
    assert one["steps"] == EQ_STEPS

    # Parameters (rank 0's checkpoint and each rank's own copy) after N steps.
    ref = trainable(tmp_path / "last.pt")
    got = trainable(two / "last.pt")
    worst = max((got[k] - v).abs().max().item() for k, v in ref.items())
    assert worst < 1e-5, f"{balancer}: max |Δθ| = {worst:.3g}"
    moved = max((ref[k] - v).abs().max().item() for k, v in torch.load(two / "rank0.pt").items()
                if k in ref)
    assert moved < 1e-5
    r0, r1 = torch.load(two / "rank0.pt"), torch.load(two / "rank1.pt")
    assert all(torch.equal(r0[k], r1[k]) for k in r0), "the ranks' parameters differ"

    # π: bit-identical on both ranks at every logged step (log_every=1: every step).
    pi0 = json.loads((two / "rank0.json").read_text())
    pi1 = json.loads((two / "rank1.json").read_text())
    assert len(pi0) == EQ_STEPS
    assert pi0 == pi1

    # Validation: every val sample counted exactly once over the two ranks (EvalSampler + sum).
    res = json.loads((two / "results.json").read_text())
    assert res["world_size"] == 2
    assert res["val_samples"] == 359
    assert res["final"]["top1"] == pytest.approx(one["final"]["top1"], abs=100 / 359 + 1e-9)  # ≤ 1 sample
