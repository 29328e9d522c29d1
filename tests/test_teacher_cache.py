"""The teacher-output cache in isolation: exact (fp32) / within tolerance (fp16) against the live teacher on
the views the loader drew, same training result, and every way a cache can be wrong is an error."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms as T
from torchvision.datasets import CIFAR100

from kdrun.data.views import ContinuousAugmentationError, ViewDataset
from kdrun.engine.teacher import Teacher
from kdrun.losses.kl import kl_divergence
from kdrun.models.taps import Tapped
from kdrun.teacher_cache import (FP16_ABS_TOL, FP16_REL_TOL, HEARTBEAT, CacheBuilder, CacheBusy, CacheError,
                                 TeacherCache, build_cache, cache_state, default_dir, make_key, refuse_mixup,
                                 wait_for_fill)

N, SIZE, PAD, CLASSES = 40, 8, 1, 5
CPU = {"device": "cpu", "precision": "fp32", "channels_last": False}


class Tiny(nn.Module):
    # 8 channels: torch's CPU sgemm gives nn.Linear(8, 5) batch-position-invariant bits (whether a width
    # such as 6 does depends on the BLAS build and the CPU, so the batch-dependent case is BatchCoupled).
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


class BatchCoupled(Tiny):
    """A teacher whose outputs depend on the rest of the batch by a rounding-sized amount (1e-7 of the
    batch's mean logits), by construction rather than through a BLAS kernel's summation order, which
    differs between torch builds and CPUs (teacher_cache.batch_invariant)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        return logits + 1e-7 * logits.mean(0, keepdim=True)


def dataset(pad: int = PAD, seed: int = 0, post: tuple = ()) -> ViewDataset:
    ds = CIFAR100.__new__(CIFAR100)  # a real torchvision CIFAR object over random images (no files)
    rng = np.random.default_rng(seed)
    ds.data = rng.integers(0, 256, (N, SIZE, SIZE, 3), dtype=np.uint8)
    ds.targets = [int(v) for v in rng.integers(0, CLASSES, N)]
    ds.transform = T.Compose([T.RandomCrop(SIZE, padding=pad), T.RandomHorizontalFlip(), *post, T.ToTensor(),
                              T.Normalize((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))])
    ds.target_transform = None
    return ViewDataset(ds)


def teacher(seed: int = 0, taps: tuple[str, ...] = ("pre_logits",), width: int = 8,
            coupled: bool = False) -> Teacher:
    torch.manual_seed(seed)
    m = (BatchCoupled if coupled else Tiny)(width)
    with torch.no_grad():  # non-trivial BatchNorm statistics
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
    return Teacher(Tapped(m, list(taps)), torch.device("cpu"), "fp32")


def fill(path: Path, dtype: str = "fp32", data: ViewDataset | None = None, t: Teacher | None = None,
         taps: tuple[str, ...] = ("pre_logits",), batch_size: int = 16, **kw) -> TeacherCache:
    data, t = data or dataset(), t or teacher(taps=taps)
    key = make_key(t.model.model, data, taps, dtype, CPU)
    return build_cache(path, key, t, data, batch_size=batch_size, progress=False, **kw)


def key_for(data: ViewDataset, t: Teacher, dtype: str = "fp32", compute=CPU, taps=("pre_logits",)):
    return make_key(t.model.model, data, taps, dtype, compute)


def test_views_and_layout(tmp_path: Path) -> None:
    cache = fill(tmp_path / "c")
    assert (cache.num_images, cache.num_views) == (N, 18)  # (2·1 + 1)² · 2
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert meta["arrays"]["logits"]["shape"] == [N, 18, CLASSES]
    assert meta["arrays"]["tap.pre_logits"]["shape"] == [N, 18, 8]
    assert meta["info"]["batch_invariant"] is True and cache.exact
    assert not (tmp_path / "c.partial").exists()


def train_students(data: ViewDataset, t: Teacher, cache: TeacherCache | None, epochs: int = 2):
    """A KD loop on the views the loader draws; the teacher's outputs come from ``cache`` if given."""
    torch.manual_seed(7)
    student = Tiny()
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    loader = DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(3))
    losses = []
    for _ in range(epochs):
        for x, y, i, v in loader:
            out = cache.get(i, v) if cache is not None else t(x)
            loss = kl_divergence(student(x), out.logits, 4.0) + F.cross_entropy(student(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
    return torch.stack(losses), student.state_dict()


def test_fp32_cache_is_bit_identical_to_the_live_teacher(tmp_path: Path) -> None:
    data, t = dataset(), teacher()
    cache = fill(tmp_path / "c", data=data, t=t)
    torch.manual_seed(11)
    seen = set()
    for x, y, i, v in DataLoader(data, batch_size=8, shuffle=True):  # training-sized batches
        live, cached = t(x), cache.get(i, v)
        assert cached.logits.dtype == live.logits.dtype == torch.float32
        assert torch.equal(cached.logits, live.logits)
        assert torch.equal(cached.features["pre_logits"], live.features["pre_logits"])
        seen.update(v.tolist())
    assert len(seen) > 9  # many different views were looked up
    # The same training result: losses and final weights bit-identical.
    l_live, w_live = train_students(data, t, None)
    l_cache, w_cache = train_students(data, t, cache)
    assert torch.equal(l_live, l_cache)
    assert all(torch.equal(w_live[k], w_cache[k]) for k in w_live)


def test_a_batch_dependent_teacher_is_flagged_not_exact(tmp_path: Path) -> None:
    data, t = dataset(), teacher(coupled=True)
    cache = fill(tmp_path / "c", data=data, t=t)
    assert cache.meta["info"]["batch_invariant"] is False and not cache.exact
    x, _, i, v = next(iter(DataLoader(data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(1))))
    live, cached = t(x), cache.get(i, v)
    assert not torch.equal(live.logits, cached.logits)  # why the flag exists
    torch.testing.assert_close(live.logits, cached.logits, rtol=1e-6, atol=1e-7)  # rounding only


def test_fp16_within_the_documented_tolerance(tmp_path: Path) -> None:
    data, t = dataset(), teacher()
    cache = fill(tmp_path / "c", "fp16", data=data, t=t)
    assert np.load(tmp_path / "c" / "logits.npy", mmap_mode="r").dtype == np.float16
    x = torch.stack([data.render(i, v) for i in range(N) for v in range(18)])
    idx = torch.arange(N).repeat_interleave(18)
    view = torch.arange(18).repeat(N)
    live, cached = t(x), cache.get(idx, view)
    assert cached.logits.dtype == torch.float32  # returned in the live teacher's dtype
    for a, b in ((live.logits, cached.logits), (live.features["pre_logits"], cached.features["pre_logits"])):
        err = (a - b).abs()
        assert (err <= FP16_REL_TOL * a.abs() + FP16_ABS_TOL).all()
        assert err.max() > 0  # it really is rounded (the check above can fail)


def test_fp16_out_of_range_is_refused(tmp_path: Path) -> None:
    t = teacher()
    with torch.no_grad():
        t.model.model.fc.bias.fill_(1e6)
    with pytest.raises(CacheError, match="fp16's range"):
        fill(tmp_path / "c", "fp16", t=t)


def test_range_fills_by_several_processes_equal_one_fill(tmp_path: Path) -> None:
    data, t = dataset(), teacher()
    one = fill(tmp_path / "one", data=data, t=t)
    key = key_for(data, t)
    specs = CacheBuilder.plan(key, data, t, lambda x: x)
    CacheBuilder.create(tmp_path / "two", key, specs)  # "rank 0"
    for rows in (range(0, 23), range(23, N)):           # every "rank" fills its images
        CacheBuilder.attach(tmp_path / "two", key).fill(t, data, 16, lambda x: x, rows=rows, progress=False)
    two = CacheBuilder.attach(tmp_path / "two", key).finalize()
    assert np.array_equal(one.arrays["logits"], two.arrays["logits"])
    assert one.specs["logits"].sha256 == two.specs["logits"].sha256


@pytest.mark.parametrize("change, field", [
    ("teacher", "teacher"), ("data", "dataset"), ("transform", "transform"), ("dtype", "dtype"),
    ("compute", "compute"), ("taps", "taps"),
])
def test_a_mismatched_key_is_an_error_naming_what_differs(tmp_path: Path, change: str, field: str) -> None:
    fill(tmp_path / "c")
    data, t = dataset(seed=1 if change == "data" else 0, pad=2 if change == "transform" else PAD), \
        teacher(seed=1 if change == "teacher" else 0)
    key = key_for(data, t, dtype="fp16" if change == "dtype" else "fp32",
                  compute={**CPU, "channels_last": True} if change == "compute" else CPU,
                  taps=("logits",) if change == "taps" else ("pre_logits",))
    with pytest.raises(CacheError, match=rf"does not match this run.*\b{field}: cache has"):
        TeacherCache.open(tmp_path / "c", key)
    TeacherCache.open(tmp_path / "c", key_for(dataset(), teacher()))  # the right key opens


def test_truncated_corrupted_missing_or_unfinished_files_are_errors(tmp_path: Path) -> None:
    fill(tmp_path / "c")
    key = key_for(dataset(), teacher())
    f = tmp_path / "c" / "logits.npy"
    good = f.read_bytes()
    f.write_bytes(good[:-4])
    with pytest.raises(CacheError, match="truncated"):
        TeacherCache.open(tmp_path / "c", key, verify="size")
    bad = bytearray(good)
    bad[-3] ^= 0xFF
    f.write_bytes(bytes(bad))
    TeacherCache.open(tmp_path / "c", key, verify="size")  # same size: only the checksum can tell
    with pytest.raises(CacheError, match="sha256"):
        TeacherCache.open(tmp_path / "c", key)
    f.write_bytes(good)
    (tmp_path / "c" / "tap.pre_logits.npy").unlink()
    with pytest.raises(CacheError, match="missing"):
        TeacherCache.open(tmp_path / "c", key)
    (tmp_path / "c" / "meta.json").write_text("{not json")
    with pytest.raises(CacheError, match="not valid JSON"):
        TeacherCache.open(tmp_path / "c", key)
    # A fill that died before finalize leaves only <dir>.partial: never opened as a cache.
    data, t = dataset(), teacher()
    CacheBuilder.create(tmp_path / "d", key, CacheBuilder.plan(key, data, t, lambda x: x))
    with pytest.raises(CacheError, match="never finished"):
        TeacherCache.open(tmp_path / "d", key)
    with pytest.raises(CacheError, match="already exists"):
        fill(tmp_path / "c")


def test_a_tap_too_large_to_cache_is_an_error_naming_its_size(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match=r"feature tap 'conv' of shape \[8, 8, 8\].*0.00 GiB.*max_tap_gib"):
        fill(tmp_path / "c", taps=("conv",), max_tap_bytes=10_000)
    assert not (tmp_path / "c").exists() and not (tmp_path / "c.partial").exists()


def test_continuous_augmentation_and_mixup_are_refused() -> None:
    ds = CIFAR100.__new__(CIFAR100)
    ds.data, ds.targets, ds.target_transform = np.zeros((2, 8, 8, 3), np.uint8), [0, 1], None
    ds.transform = T.Compose([T.RandomResizedCrop(8), T.ToTensor()])
    with pytest.raises(ContinuousAugmentationError, match="RandomResizedCrop"):
        ViewDataset(ds)
    with pytest.raises(ContinuousAugmentationError, match="ViewDataset"):
        make_key(Tiny(), ds, (), "fp32", CPU)  # type: ignore[arg-type]
    with pytest.raises(ContinuousAugmentationError, match="mixup"):
        refuse_mixup(lambda x, y: (x, y))
    refuse_mixup(None)


def test_lookup_bounds_and_bad_dtype(tmp_path: Path) -> None:
    cache = fill(tmp_path / "c")
    with pytest.raises(IndexError):
        cache.get([N], [0])
    with pytest.raises(IndexError):
        cache.get([0], [18])
    with pytest.raises(CacheError, match="fp32, fp16"):
        key_for(dataset(), teacher(), dtype="bf16")


def test_default_dir_is_shared_by_equal_keys_only(tmp_path: Path) -> None:
    data = dataset()
    a, b = key_for(data, teacher()), key_for(dataset(), teacher())
    assert default_dir(tmp_path, a) == default_dir(tmp_path, b)
    assert default_dir(tmp_path, a) != default_dir(tmp_path, key_for(data, teacher(), dtype="fp16"))


def filled_by_slices(path: Path, data: ViewDataset, t: Teacher, slices, batch_size: int,
                     all_views: bool, num_workers: int = 0) -> TeacherCache:
    """A cache filled slice by slice (as DDP ranks do) with the all-views or the per-view renderer."""
    key = key_for(data, t)
    builder = CacheBuilder.create(path, key, CacheBuilder.plan(key, data, t, lambda x: x))
    for rows in slices:
        builder.fill(t, data, batch_size, lambda x: x, rows=rows, progress=False, all_views=all_views,
                     num_workers=num_workers)
        assert builder.info["fill_render"] == ("all_views" if all_views else "per_view")
        assert builder.info["fill_views"] == len(rows) * 18 and builder.info["fill_views_per_s"] > 0
    return builder.finalize()


def same_bits(a: TeacherCache, b: TeacherCache) -> None:
    for name in a.arrays:
        assert np.array_equal(np.asarray(a.arrays[name]).view(np.uint32), np.asarray(b.arrays[name]).view(np.uint32))
        assert a.specs[name].sha256 == b.specs[name].sha256


@pytest.mark.parametrize("slices, batch_size, workers", [
    ([range(0, N)], 16, 0),                               # 720 views = 45 full batches, each 16 views < 18
    ([range(0, 7), range(7, 29), range(29, N)], 50, 0),   # batches span images, partial last batches
    ([range(0, N, 2), range(1, N, 2)], 37, 0),            # strided rows: the fancy-indexed write
    ([range(3, 20)], 64, 1),                              # rendered in a DataLoader worker process
])
def test_the_all_views_fill_is_bit_identical_to_the_per_view_fill(tmp_path: Path, slices, batch_size: int,
                                                                   workers: int) -> None:
    data, t = dataset(), teacher()
    assert data.renders_all_fast
    fast = filled_by_slices(tmp_path / "fast", data, t, slices, batch_size, all_views=True, num_workers=workers)
    slow = filled_by_slices(tmp_path / "slow", data, t, slices, batch_size, all_views=False)
    same_bits(fast, slow)
    # every (image, view) was written, with its own output (a zero or duplicated row would show here)
    images = [r for r in (0, 13, N - 1) if any(r in rows for rows in slices)]  # others stay zero
    x = torch.stack([data.render(i, v) for i in images for v in range(18)])
    ref = t(x).logits
    got = fast.get(torch.tensor(images).repeat_interleave(18), torch.arange(18).repeat(len(images))).logits
    assert torch.equal(got, ref)
    assert len({r.numpy().tobytes() for r in got}) == len(got)


def test_a_pipeline_that_is_not_pixel_wise_fills_through_the_per_view_path(tmp_path: Path) -> None:
    data, t = dataset(post=(T.Resize(SIZE + 2),)), teacher()  # Resize after the crop: not pixel-wise
    assert not data.renders_all_fast
    cache = fill(tmp_path / "c", data=data, t=t, batch_size=50)
    assert cache.meta["info"]["fill_render"] == "per_view"
    x = torch.stack([data.render(i, v) for i in range(N) for v in range(18)])
    assert torch.equal(cache.get(torch.arange(N).repeat_interleave(18), torch.arange(18).repeat(N)).logits, t(x).logits)


# -- concurrent runs: one fills, the others wait ----------------------------------------------------------


def _started(path: Path) -> tuple[CacheBuilder, ViewDataset, Teacher, Any]:
    data, t = dataset(), teacher()
    key = key_for(data, t)
    return CacheBuilder.create(path, key, CacheBuilder.plan(key, data, t, lambda x: x)), data, t, key


def test_a_second_create_is_busy_and_leaves_the_first_fill_alone(tmp_path: Path) -> None:
    builder, data, t, key = _started(tmp_path / "c")
    assert cache_state(tmp_path / "c") == "busy"
    with pytest.raises(CacheBusy, match="another process is filling"):
        CacheBuilder.create(tmp_path / "c", key, builder.specs)
    builder.fill(t, data, 16, lambda x: x, progress=False)  # the first fill is intact and finishes
    builder.finalize()
    assert cache_state(tmp_path / "c") == "ready"
    ref = fill(tmp_path / "ref")
    got = TeacherCache.open(tmp_path / "c", key)
    assert all(np.array_equal(got.arrays[n], ref.arrays[n]) for n in ref.arrays)
    assert not (tmp_path / "c" / HEARTBEAT).exists()


def test_waiting_for_another_fill_returns_once_it_is_in_place(tmp_path: Path) -> None:
    import threading

    builder, data, t, key = _started(tmp_path / "c")

    def other_process() -> None:
        time.sleep(0.3)
        builder.fill(t, data, 16, lambda x: x, progress=False)
        builder.finalize()

    said: list[str] = []
    th = threading.Thread(target=other_process)
    th.start()
    wait_for_fill(tmp_path / "c", poll_s=0.02, say=said.append)
    th.join()
    assert (tmp_path / "c" / "meta.json").is_file() and len(said) == 1 and "waiting" in said[0]
    TeacherCache.open(tmp_path / "c", key)


def test_a_fill_whose_heartbeat_stopped_is_an_error_and_is_kept(tmp_path: Path) -> None:
    _started(tmp_path / "c")
    partial = tmp_path / "c.partial"
    old = time.time() - 1000
    for f in (partial / HEARTBEAT, partial):
        os.utime(f, (old, old))
    with pytest.raises(CacheError, match=rf"{partial}.*no progress for 1\d\d\d s, so it was killed.*Delete"):
        wait_for_fill(tmp_path / "c", stale_after_s=300, poll_s=0.01)
    assert partial.is_dir()  # never deleted for the user
    # A fill that is alive (fresh heartbeat) is not stale, however old its directory.
    (partial / HEARTBEAT).touch()
    with pytest.raises(CacheError, match="ended without a cache"):
        import shutil
        import threading

        threading.Timer(0.1, shutil.rmtree, (partial,)).start()  # ... and then gives up without a cache
        wait_for_fill(tmp_path / "c", stale_after_s=300, poll_s=0.01)
