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

**Modules.** :mod:`~kdrun.teacher_cache.key` (fingerprints, :class:`CacheKey`, the key's directory),
:mod:`~kdrun.teacher_cache.store` (the arrays on disk, :class:`TeacherCache`: open with the key check and
``get``), :mod:`~kdrun.teacher_cache.fill` (:class:`CacheBuilder`, :func:`build_cache`, :func:`wait_for_fill`,
:func:`batch_invariant`) and :mod:`~kdrun.teacher_cache.orchestrate` (a run's cache from its config: key,
directory, the ranks' fill or the wait, the opened cache; used by :func:`kdrun.engine.build.build` and
``kdrun cache-teacher``). The mechanism is re-exported here; the orchestration, which reads the run's
settings and the rank facts, is imported from its module.
"""
from __future__ import annotations

from kdrun.teacher_cache.fill import (DEFAULT_MAX_TAP_BYTES, FILL_STALE_AFTER_S, HEARTBEAT, HEARTBEAT_EVERY_S,
                                      CacheBuilder, CacheBusy, batch_invariant, build_cache, unusable_dir,
                                      wait_for_fill)
from kdrun.teacher_cache.key import (FORMAT_VERSION, STORAGE, CacheError, CacheKey, dataset_fingerprint, default_dir,
                                     file_sha256, make_key, refuse_mixup, teacher_fingerprint)
from kdrun.teacher_cache.store import FP16_ABS_TOL, FP16_REL_TOL, ArraySpec, TeacherCache, cache_state

__all__ = ["DEFAULT_MAX_TAP_BYTES", "FILL_STALE_AFTER_S", "FORMAT_VERSION", "FP16_ABS_TOL", "FP16_REL_TOL",
           "HEARTBEAT", "HEARTBEAT_EVERY_S", "STORAGE", "ArraySpec", "CacheBuilder", "CacheBusy", "CacheError",
           "CacheKey", "TeacherCache", "batch_invariant", "build_cache", "cache_state", "dataset_fingerprint",
           "default_dir", "file_sha256", "make_key", "refuse_mixup", "teacher_fingerprint", "unusable_dir",
           "wait_for_fill"]
