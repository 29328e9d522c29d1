"""Checkpoints: atomic writes, weights_only reads, clear errors, RNG round trip."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from kdrun.runtime import checkpoint as ckpt
from kdrun.models.build import CheckpointError, load_weights
from kdrun.models.convnet import ConvNet


def state() -> dict:
    return {"format": ckpt.FORMAT, "student": ConvNet([4, 8]).state_dict(), "step": 3, "rng": ckpt.rng_state()}


def test_atomic_write_leaves_old_file_on_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pt"
    ckpt.save_atomic(state(), path)
    before = path.read_bytes()

    def crash(obj, f):  # noqa: ANN001
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        ckpt.save_atomic(state(), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_truncated_checkpoint_is_a_clear_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    ckpt.save_atomic(state(), path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=str(path)):
        ckpt.load(path)


def test_checkpoints_load_with_weights_only_and_rng_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    random.seed(1)
    np.random.seed(2)
    s = ckpt.rng_state()
    a = (torch.rand(3), random.random(), np.random.rand())
    ckpt.save_atomic({"format": ckpt.FORMAT, "rng": s}, tmp_path / "c.pt")
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)  # raises if anything is pickled
    ckpt.set_rng_state(loaded["rng"])
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]


def test_wrong_architecture_names_the_mismatched_keys(tmp_path: Path) -> None:
    ckpt.save_atomic(state(), tmp_path / "c.pt")
    with pytest.raises(CheckpointError) as e:
        load_weights(ConvNet([4, 8, 16]), tmp_path / "c.pt")
    assert "missing keys [stages.2.0.weight" in str(e.value) and str(tmp_path / "c.pt") in str(e.value)


def test_benchmark_style_and_ddp_prefixed_checkpoints_load(tmp_path: Path) -> None:
    src = ConvNet([4, 8])
    torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 240},
               tmp_path / "bench.pth")
    dst = ConvNet([4, 8])
    load_weights(dst, tmp_path / "bench.pth")
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k])


def test_find_resume(tmp_path: Path) -> None:
    assert ckpt.find_resume(tmp_path, None) is None
    assert ckpt.find_resume(tmp_path, "auto") is None
    (tmp_path / "last.pt").write_bytes(b"x")
    assert ckpt.find_resume(tmp_path, "auto") == tmp_path / "last.pt"
    with pytest.raises(CheckpointError):
        ckpt.find_resume(tmp_path, str(tmp_path / "nope.pt"))
