"""The cache on disk and its lookup: ``meta.json`` + one memory-mapped ``.npy`` per array
(:class:`ArraySpec`), which teacher output goes into which array (:func:`output_arrays`), the state of a cache
directory (:func:`cache_state`) and :class:`TeacherCache` (open with the key check, ``get(index, view)``)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from torch import Tensor

from kdrun.models.taps import ModelOutput
from kdrun.teacher_cache.key import CacheError, CacheKey, file_sha256

# What fp16 storage promises: |cached − live| ≤ FP16_REL_TOL·|live| + FP16_ABS_TOL (package doc, "Exactness").
FP16_REL_TOL = 2.0 ** -11
FP16_ABS_TOL = 2.0 ** -25


def array_name(tap: str) -> str:
    """The array (and ``.npy`` file stem) that holds ``tap``: ``logits`` or ``tap.<name>``."""
    return "logits" if tap == "logits" else f"tap.{tap}"


def _npy_layout(path: Path) -> tuple[list[int], np.dtype, int]:
    """(shape, dtype, expected file size) from an ``.npy`` file's header (the data follow the header)."""
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
        except (ValueError, OSError, SyntaxError) as e:
            raise CacheError(f"{path}: unreadable .npy header ({e}); delete and refill the cache.") from None
        offset = f.tell()
    if fortran:
        raise CacheError(f"{path}: Fortran-ordered array; this is not a kdrun cache file.")
    dt = np.dtype(dtype)
    return [int(d) for d in shape], dt, offset + int(np.prod(shape, dtype=np.int64)) * dt.itemsize


@dataclass
class ArraySpec:
    name: str
    shape: list[int]            # [N, V, *sample]
    dtype: str                  # storage (numpy) dtype name
    out_dtype: str              # the live teacher's output dtype (torch), what get() returns
    sha256: str = ""

    @property
    def file(self) -> str:
        return f"{self.name}.npy"

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def _torch_dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise CacheError(f"unknown output dtype {name!r} in the cache's meta.json")
    return dt


def output_arrays(out: ModelOutput, taps: Sequence[str]) -> dict[str, Tensor]:
    """The teacher's output as the cache's arrays (array name → batch): the logits and every tap in ``taps``."""
    got = {"logits": out.logits}
    for tp in taps:
        if tp == "logits":
            continue
        if tp not in out.features:
            raise CacheError(f"the teacher's output has no tap {tp!r} (it has {', '.join(out.features) or 'none'}); "
                             "build the teacher with the taps the loss terms read.")
        got[array_name(tp)] = out.features[tp]
    return got


def cache_state(path: str | os.PathLike) -> Literal["ready", "busy", "missing"]:
    """``ready``: a finished cache is at ``path`` (not yet checked against a key); ``busy``: only its
    ``.partial`` fill exists (in progress, or killed:
    :func:`~kdrun.teacher_cache.fill.wait_for_fill`); ``missing``: neither."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return "ready"
    return "busy" if path.with_name(path.name + ".partial").exists() else "missing"


@dataclass
class TeacherCache:
    """A filled cache, memory-mapped read-only. ``get(index, view)`` is the teacher's output for those
    samples, in the live teacher's output dtype, on ``device``."""

    path: Path
    meta: dict[str, Any]
    arrays: dict[str, np.memmap] = field(default_factory=dict)
    specs: dict[str, ArraySpec] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | os.PathLike, key: CacheKey, verify: Literal["full", "size"] = "full") -> "TeacherCache":
        """Open the cache at ``path`` for ``key``; :class:`CacheError` if it is missing, incomplete, stale or
        damaged. ``verify="full"`` checks every file's sha256 (a few seconds per GiB), ``"size"`` only sizes."""
        path = Path(path)
        meta_file = path / "meta.json"
        if not meta_file.is_file():
            partial = path.with_name(path.name + ".partial")
            why = (f"a fill was started under {partial} but never finished (killed, or another run is filling "
                   "it right now: wait for it); if no run is filling it, delete it and refill"
                   if partial.exists() else "build it with `kdrun cache-teacher` (or teacher.cache.fill=true)")
            raise CacheError(f"no teacher cache at {path}: {why}.")
        try:
            meta = json.loads(meta_file.read_text())
        except json.JSONDecodeError as e:
            raise CacheError(f"{meta_file} is not valid JSON ({e}): the cache is damaged; "
                             "delete and refill it.") from None
        diff = key.differences(meta.get("key", {}))
        if diff:
            raise CacheError(f"the teacher cache at {path} does not match this run (stale or for another job); "
                             "delete it or point teacher.cache.dir elsewhere. Differences: " + "; ".join(diff))
        specs = {n: ArraySpec(**a) for n, a in meta["arrays"].items()}
        arrays = {}
        for name, s in specs.items():
            f = path / s.file
            if not f.is_file():
                raise CacheError(f"teacher cache {path}: array file {s.file} is missing; delete and refill the cache.")
            shape, dtype, want = _npy_layout(f)
            if shape != s.shape or dtype != np.dtype(s.dtype):
                raise CacheError(f"teacher cache {path}: {s.file} holds {dtype}{shape}, meta.json says "
                                 f"{s.dtype}{s.shape}; delete and refill.")
            size = f.stat().st_size
            if size != want:
                raise CacheError(f"teacher cache {path}: {s.file} has {size} bytes, expected {want} "
                                 f"(shape {s.shape}, {s.dtype}): truncated or overwritten; delete and refill.")
            if verify == "full" and file_sha256(f) != s.sha256:
                raise CacheError(f"teacher cache {path}: {s.file} fails its sha256 checksum (corrupted); "
                                 "delete and refill the cache.")
            arrays[name] = np.load(f, mmap_mode="r")
        return cls(path, meta, arrays, specs)

    @property
    def exact(self) -> bool:
        """fp32 storage of a batch-invariant teacher (:func:`batch_invariant`): bit-identical to the live one."""
        info = self.meta.get("info", {})
        return self.meta["key"]["dtype"] == "fp32" and bool(info.get("batch_invariant", False))

    @property
    def num_images(self) -> int:
        return self.specs["logits"].shape[0]

    @property
    def num_views(self) -> int:
        return self.specs["logits"].shape[1]

    def _gather(self, name: str, i: np.ndarray, v: np.ndarray, device: torch.device | str | None) -> Tensor:
        t = torch.from_numpy(np.ascontiguousarray(self.arrays[name][i, v]))
        return t.to(device=device, dtype=_torch_dtype(self.specs[name].out_dtype), non_blocking=True)

    def get(self, index: Tensor | Sequence[int], view: Tensor | Sequence[int],
            device: torch.device | str | None = None) -> ModelOutput:
        """The teacher's ``ModelOutput`` for samples ``index`` drawn with views ``view`` (1-D, same length)."""
        i = torch.as_tensor(index).detach().cpu().long().numpy()
        v = torch.as_tensor(view).detach().cpu().long().numpy()
        if i.shape != v.shape or i.ndim != 1:
            raise ValueError(f"index and view must be 1-D of one length, got {i.shape} and {v.shape}")
        if i.size and (i.min() < 0 or i.max() >= self.num_images or v.min() < 0 or v.max() >= self.num_views):
            raise IndexError(f"(index, view) outside the cache's {self.num_images} images × {self.num_views} views")
        logits = self._gather("logits", i, v, device)
        feats = {n.removeprefix("tap."): self._gather(n, i, v, device) for n in self.arrays if n != "logits"}
        return ModelOutput(logits, feats)
