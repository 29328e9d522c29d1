"""A group under ``trainer.devices=2`` (``kdrun.commands.launch.dispatch_group``: two local gloo workers, each
running ``kdrun.engine.group.train_group``) trains each of its five students (fixed, dto, dto_exact,
cross_batch, mgda) bit-identically to the same job trained alone on two processes (the session's reference
runs, tests/distributed/conftest.py ``two_proc``): checkpoints with both ranks' random states, metrics.jsonl,
results.json, apart from timings and the one config key that differs (``trainer.devices``: the references
were started as a process group of their own)."""
from __future__ import annotations

import copy
import os
from pathlib import Path

from kdrun.commands.launch import dispatch_group
from kdrun.config import validate
from tests.conftest import compose_cfg
from tests.distributed.conftest import EQ_BATCH, EQ_STEPS, EQUIV
from tests.engine.test_group import BALANCERS, assert_same_run


def test_group_on_two_processes_matches_each_run_alone_on_two(two_proc: dict[str, Path], tmp_path: Path) -> None:
    cfgs = [compose_cfg([*EQUIV, f"balancer={b}", f"trainer.batch_size={EQ_BATCH}", "trainer.devices=2"])
            for b in BALANCERS]
    checked = [copy.deepcopy(c) for c in cfgs]
    settings = [validate(c) for c in checked]
    dirs = [tmp_path / b for b in BALANCERS]
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # as the references' workers
    try:
        results = dispatch_group(cfgs, checked, settings[0].trainer, dirs, [{}] * len(cfgs))
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    assert [(r.get("error"), r["steps"], r["world_size"]) for r in results] == [(None, EQ_STEPS, 2)] * len(cfgs)
    for b, d in zip(BALANCERS, dirs):
        assert_same_run(d, two_proc[f"eq/{b}"], ignore={"config"})
