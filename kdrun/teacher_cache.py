"""The teacher-output cache: the frozen teacher's outputs for every (training image, view), computed once and
read back instead of running the teacher (issue #16).

With a finite-view augmentation (:mod:`kdrun.data.views`: the CIFAR protocol's crop + flip = 162 views
per image) the frozen teacher has only ``N × V`` possible outputs on the training set. A balancer sweep
(balancers × seeds on one teacher and one protocol) pays the teacher forward — about half of a
resnet56 → resnet20 step — in every run; with the cache it is paid once.

**Layout.** A directory holding ``meta.json`` (the key, the array table with shapes, dtypes and sha256
checksums, and provenance) and one ``.npy`` file per array, memory-mapped, shaped ``[N, V, *sample_shape]``:
``logits.npy`` and ``tap.<name>.npy`` for every feature tap a loss reads. The fill writes into
``<dir>.partial/`` and renames it to ``<dir>`` only after every array is written and checksummed, so a
killed fill never looks like a cache.

**The key** (:class:`CacheKey`) names everything the outputs depend on: the teacher (its class, its
``state_dict`` hash, its config), the training data (content hash of the raw images and labels), the
transform (every step's repr and the view geometry), the taps, the storage dtype, and the conditions of
the teacher call (device type, precision, memory format) — on CPU, fp32 convolutions differ in the last
bits between contiguous and channels_last inputs, so a cache filled in another format is not what the
live teacher would produce. :meth:`TeacherCache.open` compares the key field by field and raises
:class:`CacheError` naming every field that differs; a missing, truncated or corrupted array file
(size or sha256 mismatch) is an error too. Nothing is ever silently refilled or reused.

**Concurrent runs.** Runs of a sweep that start together and need the same missing cache do not race:
creating ``<dir>.partial/`` is atomic, so exactly one of them fills it while the others wait
(:func:`wait_for_fill`) and then open the finished cache. The filling process touches
``<dir>.partial/heartbeat`` every few seconds; a partial fill whose heartbeat has stopped for
:data:`FILL_STALE_AFTER_S` was killed, and the waiting run stops with an error naming the directory to
delete (never deleting it itself).

**Exactness.** ``dtype="fp32"`` stores the teacher's outputs exactly (a bf16 or fp16 output is widened
losslessly) and :meth:`TeacherCache.get` returns them in the live teacher's output dtype, so losses are
bit-identical to the live teacher when the fill ran under the same conditions (the key's ``compute``
field) and the teacher's kernels give a sample the same bits wherever it sits in a batch — the fill
measures that (:func:`batch_invariant`, ``meta.json`` ``info.batch_invariant``, :attr:`TeacherCache.exact`);
when they do not, cached and live outputs differ by float rounding only. (The batch size did not
change resnet56's per-sample fp32 CPU result between batches 16, 64 and 256, but batch 1 did, so the
fill pads its last batch to full size and records its batch size in ``meta.json``'s provenance.)
The fill renders every view of an image at once (:meth:`kdrun.data.views.FiniteViewPipeline.render_all`:
pre-processing, pad, ToTensor and Normalize once per image instead of once per view, bit-identical to the
per-view render) when the steps after the crop are pixel-wise, else view by view; ``meta.json``
``info.fill_render`` says which, ``info.fill_views_per_s`` how fast it went.
``dtype="fp16"`` halves the disk size; each value is rounded to nearest fp16, so
``|cached − live| ≤ 2⁻¹¹·|live| + 2⁻²⁵`` (unit roundoff; the second term covers fp16 subnormals), and a
value outside fp16's range (|x| > 65504) is an error at fill time.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from kdrun.config import ConfigError
from kdrun.data.views import NUMPY_DTYPES, ContinuousAugmentationError, ViewDataset
from kdrun.models.taps import ModelOutput

FORMAT_VERSION = 1
STORAGE = {"fp32": np.float32, "fp16": np.float16}
DEFAULT_MAX_TAP_BYTES = 16 * 2**30  # a feature tap larger than this is refused (spatial maps: pool them)
FP16_REL_TOL = 2.0 ** -11
FP16_ABS_TOL = 2.0 ** -25


class CacheError(ConfigError):
    """A cache that cannot be used: missing, incomplete, stale (key mismatch), truncated or corrupted.
    A :class:`~kdrun.config.ConfigError` (a ``ValueError``): the CLI shows the message, exit status 2."""


class CacheBusy(CacheError):
    """``<dir>.partial/`` (or the cache itself) already exists: another process is filling this cache or has
    just filled it (or a killed fill left the ``.partial``)."""


# A fill touches <dir>.partial/heartbeat at least this often; a partial fill whose heartbeat is older than
# FILL_STALE_AFTER_S is taken for a killed one (wait_for_fill). Hashing a multi-GiB array in finalize
# touches it before each file, so the slowest gap is one file's sha256.
HEARTBEAT = "heartbeat"
HEARTBEAT_EVERY_S = 5.0
FILL_STALE_AFTER_S = 300.0


def unusable_dir(path: str | os.PathLike) -> str | None:
    """Why the directory ``path`` cannot be created or written (its first existing ancestor is a file or
    not writable by this user), or None. Asked before a fill or a teacher fit creates anything, so that the
    error names the setting that placed it (``teacher.cache.dir``, ``KDRUN_CACHE``): ``mkdir`` under a file
    raises FileExistsError, which the fill would take for another process's fill in progress."""
    path = Path(path).expanduser()
    for parent in [path, *path.parents]:
        if parent.exists():
            if not parent.is_dir():
                return f"{parent} is a file, not a directory"
            if not os.access(parent, os.W_OK | os.X_OK):
                return f"{parent} is not writable by this user"
            return None
    return None


# -- fingerprints -------------------------------------------------------------------------------------


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


# -- the key ------------------------------------------------------------------------------------------


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


# -- the on-disk arrays -------------------------------------------------------------------------------


def _array_name(tap: str) -> str:
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


def _outputs(out: ModelOutput, taps: Sequence[str]) -> dict[str, Tensor]:
    got = {"logits": out.logits}
    for tp in taps:
        if tp == "logits":
            continue
        if tp not in out.features:
            raise CacheError(f"the teacher's output has no tap {tp!r} (it has {', '.join(out.features) or 'none'}); "
                             "build the teacher with the taps the loss terms read.")
        got[_array_name(tp)] = out.features[tp]
    return got


class _Pairs(Dataset):
    """(x, image index, view) for every view of images ``rows`` (image-major: sequential writes); the
    per-view fill, for pipelines whose views cannot all be rendered at once (``renders_all_fast``)."""

    def __init__(self, data: ViewDataset, rows: range) -> None:
        self.data, self.rows, self.v = data, rows, data.num_views

    def __len__(self) -> int:
        return len(self.rows) * self.v

    def __getitem__(self, k: int) -> tuple[Tensor, int, int]:
        i, view = self.rows[k // self.v], k % self.v
        return self.data.render(i, view), i, view


class _AllViews(Dataset):
    """Every view of image ``rows[k]`` as one ``[V, C, H, W]`` tensor (:meth:`ViewDataset.render_views`)."""

    def __init__(self, data: ViewDataset, rows: range) -> None:
        self.data, self.rows = data, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int) -> Tensor:
        return self.data.render_views(self.rows[k])


def _rebatch(chunks: Iterable[Tensor], batch_size: int) -> Iterator[Tensor]:
    """The rows of ``chunks``, in order, in batches of exactly ``batch_size`` (the last may be shorter;
    batches span chunks). Every batch is a fresh contiguous tensor, as a DataLoader's collated batch is."""
    buf: Tensor | None = None
    filled = 0
    for c in chunks:
        s = 0
        while s < len(c):
            if buf is None:
                buf, filled = torch.empty((batch_size, *c.shape[1:]), dtype=c.dtype), 0
            take = min(batch_size - filled, len(c) - s)
            dst, src = buf[filled:filled + take], c[s:s + take]
            if c.dtype in NUMPY_DTYPES:  # numpy: one thread (torch's parallel copy stalls on busy cores)
                dst.numpy()[...] = src.numpy()
            else:
                dst.copy_(src)
            filled, s = filled + take, s + take
            if filled == batch_size:
                yield buf
                buf = None
    if buf is not None:
        yield buf[:filled]


def _flat_targets(rows: range, v: int, k0: int, k1: int) -> slice | np.ndarray:
    """Rows of the ``[N·V, ...]`` view of an array for positions ``k0 ≤ k < k1`` of the image-major order
    over ``rows`` × views (position ``k`` = image ``rows[k // v]``, view ``k % v``)."""
    if rows.step == 1:
        return slice(rows.start * v + k0, rows.start * v + k1)
    k = np.arange(k0, k1)
    return np.asarray(rows)[k // v] * v + k % v


# -- building -----------------------------------------------------------------------------------------


class CacheBuilder:
    """Creates ``<path>.partial/``, fills it, and :meth:`finalize` turns it into the cache at ``path``.

    One process: ``CacheBuilder.create(...)``, ``fill(...)``, ``finalize()``. Several (DDP ranks on one
    node): rank 0 ``create``s, every rank ``attach``es and ``fill``s its own ``rows``, rank 0 ``finalize``s
    (barriers between the three). ``teacher(x) -> ModelOutput`` is the live teacher call (frozen, eval;
    :class:`kdrun.engine.teacher.Teacher` is one), and ``prepare(x)`` moves a rendered batch to the
    teacher's device and memory format exactly as the training step does."""

    def __init__(self, path: Path, key: CacheKey, specs: dict[str, ArraySpec], mode: str) -> None:
        self.path, self.key, self.specs = Path(path), key, specs
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.arrays = {n: np.lib.format.open_memmap(self.partial / s.file, mode=mode)  # type: ignore[no-untyped-call]
                       for n, s in specs.items()}
        self.info: dict[str, Any] = {}
        self._beat = 0.0  # time.monotonic() of the last heartbeat this process wrote

    def heartbeat(self, force: bool = False) -> None:
        """Tell waiting processes this fill is alive (at most every HEARTBEAT_EVERY_S unless ``force``)."""
        now = time.monotonic()
        if force or now - self._beat >= HEARTBEAT_EVERY_S:
            (self.partial / HEARTBEAT).touch()
            self._beat = now

    @staticmethod
    def plan(key: CacheKey, dataset: ViewDataset, teacher: Callable[[Tensor], ModelOutput],
             prepare: Callable[[Tensor], Tensor], max_tap_bytes: int = DEFAULT_MAX_TAP_BYTES) -> dict[str, ArraySpec]:
        """The arrays: shapes from one probe call on image 0 (views 0 and 1: batch 1 can differ)."""
        x = torch.stack([dataset.render(0, v % dataset.num_views) for v in range(2)])
        outs = _outputs(teacher(prepare(x)), key.taps)
        n, v, store = len(dataset), dataset.num_views, STORAGE[key.dtype]
        specs = {name: ArraySpec(name, [n, v, *t.shape[1:]], np.dtype(store).name, str(t.dtype))
                 for name, t in outs.items()}
        for name, s in specs.items():
            if name != "logits" and s.nbytes > max_tap_bytes:
                raise CacheError(
                    f"feature tap {name.removeprefix('tap.')!r} of shape {s.shape[2:]} per sample is too large to "
                    f"cache: {n} images × {v} views × {s.nbytes // (n * v)} B = {s.nbytes / 2**30:.2f} GiB "
                    f"(limit teacher.cache.max_tap_gib={max_tap_bytes / 2**30:g}). Cache a pooled tap, raise the "
                    "limit, or use teacher.cache=null.")
        return specs

    @classmethod
    def create(cls, path: str | os.PathLike, key: CacheKey, specs: dict[str, ArraySpec]) -> "CacheBuilder":
        path = Path(path)
        if path.exists():  # CacheBusy too: a sweep's other run may have finished its fill since we looked
            raise CacheBusy(f"{path} already exists; open it with TeacherCache.open, or delete it to refill.")
        partial = path.with_name(path.name + ".partial")
        why = unusable_dir(partial)
        if why is not None:
            raise CacheError(
                f"the teacher cache {path} cannot be created ({why}). Point teacher.cache.dir at a writable "
                "directory, or (its default is $KDRUN_CACHE/teacher_outputs) point KDRUN_CACHE at one "
                f"(KDRUN_CACHE={os.environ.get('KDRUN_CACHE') or 'unset: ~/.cache/kdrun'}).")
        try:
            # Atomic: of several runs of a sweep starting together, exactly one creates the directory and
            # fills it; the others get CacheBusy and wait for it (wait_for_fill). An existing one is never
            # deleted here: it may be another process's fill in progress.
            partial.mkdir(parents=True)
        except FileExistsError:
            raise CacheBusy(f"{partial} exists: another process is filling this teacher cache, or a killed fill "
                            "left it (wait_for_fill tells the two apart by its heartbeat).") from None
        (partial / HEARTBEAT).touch()
        need = sum(s.nbytes for s in specs.values())
        free = shutil.disk_usage(partial).free
        if need > free:
            shutil.rmtree(partial)
            raise CacheError(f"the teacher cache needs {need / 2**30:.2f} GiB but {partial.parent} has "
                             f"{free / 2**30:.2f} GiB free.")
        for s in specs.values():
            arr = np.lib.format.open_memmap(partial / s.file, mode="w+",  # type: ignore[no-untyped-call]
                                            dtype=np.dtype(s.dtype), shape=tuple(s.shape))
            arr.flush()
        (partial / "plan.json").write_text(json.dumps({"key": key.to_json(),
                                                       "arrays": {n: asdict(s) for n, s in specs.items()}}))
        return cls(path, key, specs, "r+")

    @classmethod
    def attach(cls, path: str | os.PathLike, key: CacheKey) -> "CacheBuilder":
        """Another process's view of a fill ``create``d by rank 0."""
        partial = Path(path).with_name(Path(path).name + ".partial")
        plan = json.loads((partial / "plan.json").read_text())
        diff = key.differences(plan["key"])
        if diff:
            raise CacheError(f"the fill under {partial} was planned with another key: " + "; ".join(diff))
        return cls(Path(path), key, {n: ArraySpec(**a) for n, a in plan["arrays"].items()}, "r+")

    def fill(self, teacher: Callable[[Tensor], ModelOutput], dataset: ViewDataset, batch_size: int,
             prepare: Callable[[Tensor], Tensor], rows: range | None = None, num_workers: int = 0,
             progress: bool = True, all_views: bool = True) -> None:
        """Run ``teacher`` on every view of images ``rows`` (default: all) and write the outputs.

        Image-major order in batches of exactly ``batch_size`` views (a batch may span images; the last is
        padded to full size). Views are rendered all at once per image (:meth:`ViewDataset.render_views`,
        bit-identical to the per-view render) when ``all_views`` and the pipeline allows it
        (``dataset.renders_all_fast``), else one by one (``all_views=False`` forces that: the reference the
        tests compare with). ``num_workers`` render in DataLoader worker processes."""
        rows = rows if rows is not None else range(len(dataset))
        n, v = self.specs["logits"].shape[:2]
        if len(dataset) != n or dataset.num_views != v:
            raise CacheError(f"the data set has {len(dataset)} images × {dataset.num_views} views, the cache "
                             f"was planned for {n} × {v}")
        self.info["batch_invariant"] = batch_invariant(teacher, dataset, prepare, self.key.taps, batch_size)
        fast = all_views and dataset.renders_all_fast
        # Their own generator: creating the iterator would otherwise draw the worker base seed from the global
        # RNG, and a run that fills the cache would then train on other random numbers than one that finds it.
        gen = torch.Generator().manual_seed(0)
        if fast:  # one item = all views of one image, regrouped into batches of batch_size views
            batches: Iterable[Tensor] = _rebatch(DataLoader(_AllViews(dataset, rows), batch_size=None,
                                                            num_workers=num_workers, generator=gen), batch_size)
        else:
            batches = (x for x, _, _ in DataLoader(_Pairs(dataset, rows), batch_size=batch_size, shuffle=False,
                                                   num_workers=num_workers, generator=gen))
        bar = _progress(len(rows) * v, progress, f"teacher cache {self.path.name}")
        t0 = time.perf_counter()
        store = np.dtype(self.specs["logits"].dtype)
        # [N·V, ...] views of the memmaps: a batch's rows are consecutive there (one slice write per array)
        flat = {name: a.reshape(n * v, *a.shape[2:]) for name, a in self.arrays.items()}
        k0 = 0
        for x in batches:
            b = len(x)
            if b < batch_size:  # the last batch: pad to full size (batch 1 can differ in the last bits)
                x = torch.cat([x, x[:1].expand(batch_size - b, *x.shape[1:])])
            target = _flat_targets(rows, v, k0, k0 + b)
            for name, t in _outputs(teacher(prepare(x)), self.key.taps).items():
                a = t[:b].detach().float().cpu().numpy()
                with np.errstate(over="ignore"):  # an overflow is reported just below
                    s = a.astype(store)
                if store == np.float16 and not np.array_equal(np.isfinite(s), np.isfinite(a)):
                    raise CacheError(f"{name}: teacher outputs outside fp16's range (max |x| = "
                                     f"{np.abs(a[np.isfinite(a)]).max():.4g} > 65504); use teacher.cache.dtype=fp32.")
                flat[name][target] = s
            k0 += b
            bar.update(b)
            self.heartbeat()
        bar.close()
        if k0 != len(rows) * v:  # the renderers' contract; a short write would leave zeros in the cache
            raise RuntimeError(f"the fill rendered {k0} views, expected {len(rows)} images × {v} views")
        for a in self.arrays.values():
            a.flush()
        seconds = time.perf_counter() - t0
        self.info.update({"fill_batch_size": batch_size, "fill_seconds": seconds, "fill_views": k0,
                          "fill_views_per_s": k0 / seconds if seconds > 0 else 0.0,
                          "fill_render": "all_views" if fast else "per_view"})

    def finalize(self, info: dict[str, Any] | None = None) -> "TeacherCache":
        """Checksum every array, write ``meta.json`` and move the directory into place (atomically)."""
        for a in self.arrays.values():
            a.flush()
        self.arrays.clear()  # close the memmaps before hashing/renaming
        for s in self.specs.values():
            self.heartbeat(force=True)  # hashing a multi-GiB array takes a while
            s.sha256 = file_sha256(self.partial / s.file)
        meta = {"key": self.key.to_json(), "arrays": {n: asdict(s) for n, s in self.specs.items()},
                "info": {"torch": torch.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                         **self.info, **(info or {})}}
        (self.partial / "plan.json").unlink(missing_ok=True)
        (self.partial / HEARTBEAT).unlink(missing_ok=True)
        tmp = self.partial / "meta.json.tmp"
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, self.partial / "meta.json")
        os.replace(self.partial, self.path)
        return TeacherCache.open(self.path, self.key, verify="size")


def cache_state(path: str | os.PathLike) -> Literal["ready", "busy", "missing"]:
    """``ready``: a finished cache is at ``path`` (not yet checked against a key); ``busy``: only its
    ``.partial`` fill exists (in progress, or killed: :func:`wait_for_fill`); ``missing``: neither."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return "ready"
    return "busy" if path.with_name(path.name + ".partial").exists() else "missing"


def _last_progress(partial: Path) -> float | None:
    """When the fill under ``partial`` last showed progress (its heartbeat, else the directory's mtime)."""
    for f in (partial / HEARTBEAT, partial):
        try:
            return f.stat().st_mtime
        except FileNotFoundError:
            continue
    return None


def wait_for_fill(path: str | os.PathLike, stale_after_s: float = FILL_STALE_AFTER_S, poll_s: float = 2.0,
                  say: Callable[[str], None] | None = None) -> None:
    """Wait while another process fills the cache at ``path`` (its ``.partial`` exists) until it is in
    place. A fill whose heartbeat has not moved for ``stale_after_s`` is a killed one: :class:`CacheError`
    naming the directory to delete (it is never deleted for the user: a slow fill on another machine of a
    shared file system must not lose its work). ``say`` prints the one line that says it is waiting."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    said = False
    while not (path / "meta.json").is_file():
        last = _last_progress(partial)
        if last is None:  # the fill moved into place between the two looks, or it was given up
            if (path / "meta.json").is_file():
                return
            raise CacheError(f"the fill of the teacher cache {path} by another process ended without a cache "
                             "(it failed or was deleted); run again to fill it.")
        age = time.time() - last
        if age > stale_after_s:
            raise CacheError(
                f"a teacher-cache fill under {partial} has shown no progress for {age:.0f} s, so it was killed "
                f"(a live fill touches {partial / HEARTBEAT} every {HEARTBEAT_EVERY_S:g} s). Delete {partial} "
                "and run again (or `kdrun cache-teacher` with the same overrides) to fill it anew.")
        if not said and say is not None:
            say(f"[kdrun] another process is filling the teacher cache {path} (progress {age:.0f} s ago); "
                "waiting for it to finish")
            said = True
        time.sleep(poll_s)


def batch_invariant(teacher: Callable[[Tensor], ModelOutput], dataset: ViewDataset,
                    prepare: Callable[[Tensor], Tensor], taps: Sequence[str], batch_size: int) -> bool:
    """Whether the teacher's per-sample outputs are bitwise independent of the sample's position in the
    batch and of the batch size (≥ 2): a permuted batch and its first half must give the same bits.

    The cache is exact (fp32) only for such a teacher: a training batch puts each sample at another
    position than the fill did. CPU BLAS kernels are not always so — ``nn.Linear(6, 5)`` under torch
    2.14's CPU sgemm changes the last bit with the row position, ``nn.Linear(8, 5)`` does not — so the
    fill measures it and records it in ``meta.json`` (``info.batch_invariant``); :attr:`TeacherCache.exact`
    reports it. When false, cached outputs differ from the live teacher's by float rounding only."""
    b = max(4, min(batch_size, 32))
    n, v = len(dataset), dataset.num_views
    x = prepare(torch.stack([dataset.render((7 * k) % n, (5 * k + 1) % v) for k in range(b)]))
    perm = torch.randperm(b, generator=torch.Generator().manual_seed(0))
    full = _outputs(teacher(x), taps)
    permuted = _outputs(teacher(x[perm.to(x.device)]), taps)
    half = _outputs(teacher(x[: b // 2]), taps)
    return all(torch.equal(full[k][perm.to(full[k].device)], permuted[k]) and torch.equal(full[k][: b // 2], half[k])
               for k in full)


def build_cache(path: str | os.PathLike, key: CacheKey, teacher: Callable[[Tensor], ModelOutput],
                dataset: ViewDataset, batch_size: int, prepare: Callable[[Tensor], Tensor] = lambda x: x,
                num_workers: int = 0, progress: bool = True, max_tap_bytes: int = DEFAULT_MAX_TAP_BYTES,
                info: dict[str, Any] | None = None, all_views: bool = True) -> "TeacherCache":
    """Plan, create, fill (one process; ``all_views``: :meth:`CacheBuilder.fill`) and finalize the cache at
    ``path``."""
    specs = CacheBuilder.plan(key, dataset, teacher, prepare, max_tap_bytes)
    builder = CacheBuilder.create(path, key, specs)
    builder.fill(teacher, dataset, batch_size, prepare, num_workers=num_workers, progress=progress,
                 all_views=all_views)
    return builder.finalize(info)


def _progress(total: int, enabled: bool, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="view", smoothing=0.05)


# -- lookup -------------------------------------------------------------------------------------------


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
