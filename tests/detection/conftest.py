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


@pytest.fixture
def vidt_pair() -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    """A small ViDT-nano student and an independently initialised one as its frozen teacher (eval), and a
    batch of two 64×48 images: what the token distillation terms compare, at test size."""
    from kdrun.models.vidt import vidt_nano

    torch.manual_seed(0)
    student = vidt_nano(num_classes=3, det_tokens=6, dec_layers=2)
    teacher = vidt_nano(num_classes=3, det_tokens=6, dec_layers=2).eval()
    return student, teacher, torch.randn(2, 3, 64, 48)
