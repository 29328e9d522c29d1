"""A Hydra multirun with the basic launcher whose every job is itself a 2-process DDP run."""
from __future__ import annotations

import json
from pathlib import Path

from tests.distributed.conftest import COMMON, finish, kdrun_train


def test_two_balancers_make_two_run_dirs(tmp_path: Path) -> None:
    # Two jobs, not four (a seed axis too cost 15 s of the suite and tested nothing more: each job is a
    # 2-process run of its own either way).
    code, out = finish(kdrun_train(
        ["-m", "balancer=fixed,dto", "seed=1", *COMMON, "trainer.devices=2", "trainer.epochs=1",
         "trainer.max_steps=3", "trainer.batch_size=32", "logger.log_every=1", "logger.grad_stats_every=0",
         "trainer.save_best=false", f"hydra.sweep.dir={tmp_path}",
         "hydra.sweep.subdir=${hydra.job.num}"]), timeout=400)
    assert code == 0, out[-3000:]
    dirs = sorted(d for d in tmp_path.iterdir() if d.is_dir())
    assert len(dirs) == 2, dirs  # one directory per job, none per rank
    seen = set()
    for d in dirs:
        res = json.loads((d / "results.json").read_text())
        assert res["world_size"] == 2 and res["steps"] == 3 and res["run_dir"] == str(d)
        seen.add((res["config"]["balancer"]["_target_"].rsplit(".", 1)[-1], res["config"]["seed"]))
    assert seen == {("Fixed", 1), ("DTOAmortised", 1)}
