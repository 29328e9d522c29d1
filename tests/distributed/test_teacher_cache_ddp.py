"""The teacher-output cache under DDP (2 gloo processes): the ranks fill the cache together (each its own
slice of the images) and the result is the single-process fill byte for byte; a 2-process run that reads
the cache trains exactly as the 2-process live-teacher run."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.distributed.conftest import assert_identical, resolved_yaml, trainable
from tests.engine.test_teacher_cache_engine import BASE, cached


def test_two_processes_fill_and_read_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kdrun.commands.cache_teacher import main as cache_teacher
    from kdrun.commands.launch import spawn
    from tests.distributed.helpers import run_jobs

    common = ["trainer.save_best=false"]
    jobs = [(resolved_yaml([*BASE, *common]), str(tmp_path / "live")),
            (resolved_yaml(cached(tmp_path / "cache", *common)), str(tmp_path / "fill")),
            (resolved_yaml(cached(tmp_path / "cache", *common)), str(tmp_path / "found"))]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # inherited by the workers, as in the CLI's runs
    ranks = spawn(run_jobs, (jobs,), 2, grace_s=10)
    assert sorted(ranks.values()) == [0, 1]
    live = trainable(tmp_path / "live" / "last.pt")
    for name in ("fill", "found"):
        assert_identical(live, trainable(tmp_path / name / "last.pt"))
        for r in (0, 1):  # each rank's own copy too
            assert (tmp_path / name / f"rank{r}.json").read_text() == (tmp_path / "live" / f"rank{r}.json").read_text()
    (entry,) = list((tmp_path / "cache").iterdir())
    assert json.loads((entry / "meta.json").read_text())["info"]["world_size"] == 2  # filled by both ranks
    # The same key filled by one process: the same directory name and the same bytes.
    assert cache_teacher(cached(tmp_path / "one")) == 0
    (one,) = list((tmp_path / "one").iterdir())
    assert one.name == entry.name
    assert np.array_equal(np.load(one / "logits.npy"), np.load(entry / "logits.npy"))
