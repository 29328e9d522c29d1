"""Shared fixtures of the detection tests: one torch thread, a small synthetic COCO-format set."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """The detector runs many small ops: on two shared, busy cores one thread was measured several times
    faster than two (an engine run here: 105 s → 11 s), so these tests use one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kdrun.data.coco import make_synthetic_coco

    return make_synthetic_coco(tmp_path_factory.mktemp("coco_syn"), num_train=6, num_val=8, image_size=64,
                               num_classes=3, max_objects=3, seed=3)
