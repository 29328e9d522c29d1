"""The cache key (:class:`CacheKey`): everything the teacher's cached outputs depend on, fingerprinted
(:func:`teacher_fingerprint`, :func:`dataset_fingerprint`), and the directory a key names
(:func:`default_dir`). The package doc (:mod:`kdrun.teacher_cache`) says what the key holds and why."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from kdrun.config import ConfigError
from kdrun.data.views import ContinuousAugmentationError, ViewDataset

FORMAT_VERSION = 1
STORAGE = {"fp32": np.float32, "fp16": np.float16}


class CacheError(ConfigError):
    """A cache that cannot be used: missing, incomplete, stale (key mismatch), truncated or corrupted.
    A :class:`~kdrun.config.ConfigError` (a ``ValueError``): the CLI shows the message, exit status 2."""


def _sha256_bytes(chunks: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    with open(path, "rb") as f:
        return _sha256_bytes(iter(lambda: f.read(chunk), b""))


def _tensor_bytes(t: Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def teacher_fingerprint(model: nn.Module, config: str = "") -> dict[str, str]:
    """The teacher's identity: class, sha256 over its ``state_dict`` (names, dtypes, shapes and bytes of
    every parameter and buffer, in name order) and its config (e.g. the resolved ``teacher.model`` node)."""
    sd = model.state_dict()

    def chunks() -> Iterable[bytes]:
        for name in sorted(sd):
            t = sd[name]
            yield f"{name}|{t.dtype}|{tuple(t.shape)}|".encode()
            yield _tensor_bytes(t)

    return {"class": f"{type(model).__module__}.{type(model).__qualname__}", "state_sha256": _sha256_bytes(chunks()),
            "config": config}


def _array_bytes(a: Any) -> bytes:
    if isinstance(a, Tensor):
        return _tensor_bytes(a)
    arr = np.ascontiguousarray(np.asarray(a))
    return f"{arr.dtype}|{arr.shape}|".encode() + arr.tobytes()


def dataset_fingerprint(ds: Dataset) -> dict[str, Any]:
    """The training data's identity: class, length and a sha256 of its raw content. Data sets that hold
    their images in memory (torchvision's CIFAR: ``data`` + ``targets``) are hashed from those arrays;
    any other data set from every raw sample (image bytes and label), one pass over the data.

    ``ds`` is a :class:`ViewDataset` or a torchvision-style data set; the *raw* samples are hashed, so
    the transform is not part of this (it is the key's ``transform`` field)."""
    base = ds.base if isinstance(ds, ViewDataset) else ds
    raw = ds.raw if isinstance(ds, ViewDataset) else ds
    n = len(base)  # type: ignore[arg-type]
    cls = f"{type(base).__module__}.{type(base).__qualname__}"
    if getattr(base, "data", None) is not None and getattr(base, "targets", None) is not None:
        digest = _sha256_bytes([_array_bytes(base.data), _array_bytes(base.targets)])  # type: ignore[attr-defined]
        how = "data+targets"
    else:
        def chunks() -> Iterable[bytes]:
            for i in range(n):
                img, y = raw[i][:2]
                yield _array_bytes(img if isinstance(img, Tensor) else np.asarray(img))
                yield _array_bytes(np.asarray(y))
        digest, how = _sha256_bytes(chunks()), "samples"
    return {"class": cls, "len": n, "sha256": digest, "hashed": how}


@dataclass
class CacheKey:
    """Everything the cached outputs depend on (module doc). ``compute`` is the live teacher call's
    conditions: ``{"device": "cpu"|"cuda"|..., "precision": ..., "channels_last": bool}``."""

    teacher: dict[str, str]
    dataset: dict[str, Any]
    transform: dict[str, Any]
    taps: tuple[str, ...]
    dtype: Literal["fp32", "fp16"]
    compute: dict[str, Any]
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.dtype not in STORAGE:
            raise CacheError(f"teacher.cache.dtype={self.dtype!r} is not one of {', '.join(STORAGE)}")
        self.taps = tuple(sorted(self.taps))

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps({**asdict(self), "taps": list(self.taps)}))

    def digest(self) -> str:
        """sha256 of the canonical key JSON: the default directory name, so runs with one key share one cache."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()

    def differences(self, other: dict[str, Any]) -> list[str]:
        """``field: cached … ≠ wanted …`` for every top-level field that differs from ``other`` (JSON)."""
        mine = self.to_json()

        def short(v: Any) -> str:
            s = json.dumps(v, sort_keys=True)
            return s if len(s) <= 160 else s[:157] + "..."

        return [f"{k}: cache has {short(other.get(k))}, this run needs {short(mine[k])}"
                for k in mine if mine[k] != other.get(k)]


def make_key(teacher_model: nn.Module, dataset: ViewDataset, taps: Sequence[str], dtype: str,
             compute: dict[str, Any], teacher_config: str = "") -> CacheKey:
    """The key of ``teacher_model``'s outputs on ``dataset`` (a :class:`ViewDataset`)."""
    if not isinstance(dataset, ViewDataset):
        raise ContinuousAugmentationError("the teacher cache needs a ViewDataset (kdrun.data.views), which "
                                          "reports the view each sample was drawn with.")
    pipe = dataset.pipeline
    return CacheKey(teacher=teacher_fingerprint(teacher_model, teacher_config), dataset=dataset_fingerprint(dataset),
                    transform=pipe.describe() if pipe is not None else {}, taps=tuple(taps),
                    dtype=dtype, compute=dict(compute))  # type: ignore[arg-type]


def default_dir(root: str | os.PathLike, key: CacheKey) -> Path:
    """``<root>/<first 16 hex digits of the key digest>``: every run with the same key finds the same cache."""
    return Path(os.path.expanduser(str(root))) / key.digest()[:16]


def refuse_mixup(mixup: Any) -> None:
    """Mixup/cutmix make the teacher's input continuous: no finite set of views exists."""
    if mixup is not None:
        raise ContinuousAugmentationError(
            "the data set applies mixup/cutmix, which mixes random pairs with random weights: the teacher's "
            "input is not one of a finite set of views, so its outputs cannot be cached. Use teacher.cache=null.")
