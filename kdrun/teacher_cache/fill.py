"""Filling a cache: :class:`CacheBuilder` (plan, create ``<dir>.partial/`` atomically, fill a slice of the
images, finalize), :func:`build_cache` (all of it in one process), :func:`wait_for_fill` (another process's
fill, told from a killed one by its heartbeat) and :func:`batch_invariant` (whether the cache can be exact)."""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from kdrun.data.views import NUMPY_DTYPES, ViewDataset
from kdrun.models.taps import ModelOutput
from kdrun.teacher_cache.key import STORAGE, CacheError, CacheKey, file_sha256
from kdrun.teacher_cache.store import ArraySpec, TeacherCache, output_arrays

DEFAULT_MAX_TAP_BYTES = 16 * 2**30  # a feature tap larger than this is refused (spatial maps: pool them)


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
        outs = output_arrays(teacher(prepare(x)), key.taps)
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
            for name, t in output_arrays(teacher(prepare(x)), self.key.taps).items():
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
    full = output_arrays(teacher(x), taps)
    permuted = output_arrays(teacher(x[perm.to(x.device)]), taps)
    half = output_arrays(teacher(x[: b // 2]), taps)
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
