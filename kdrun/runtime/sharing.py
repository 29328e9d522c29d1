"""Which jobs of a sweep can share one data pipeline and one teacher forward (``hydra/launcher=kdrun_shared``).

The rule, in one place: two jobs share when their composed configs are equal everywhere except at the
**student-side** paths of :data:`STUDENT_SIDE`. Everything not listed there (the data set with its
augmentation and mixup, the batch size, the seeds, the teacher and its output cache, the trainer keys that
shape the data stream, the step count or the devices) must be equal, so a key that nobody thought about
keeps jobs apart instead of silently sharing what differs: the list is an allow-list.

A path is student-side when, with the data side equal, it changes only what happens after the teacher
forward, in objects that each student owns (its model, loss modules, balancer, optimiser, scheduler,
scaler, random state) or what a run writes about itself, and when building it consumes no random numbers
*before* the teacher side is built (:func:`kdrun.engine.build.build`: seed → data, task, loss terms,
teacher, then the student and the rest). That second condition is why a distillation term's ``weight``
is student-side and the rest of the term is not: the terms are constructed before the teacher (CRD's
memory bank draws random numbers; a random teacher's weights come after them), and they decide which
teacher features are tapped and cached.

Groups are lists of job indices in sweep order, ordered by their first job (:func:`group_jobs`).
"""
from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

# path pattern (dotted; "*" = any one key) → why it is student-side. A pattern covers the node and all
# below it. Everything else must be equal between the jobs of a group.
STUDENT_SIDE: dict[str, str] = {
    "balancer": "the method a balancer sweep compares: each student has its own balancer and its state",
    "optimizer": "each student's own optimiser over its own parameters",
    "scheduler": "each student's own learning-rate schedule (the step count it reads is data side)",
    "projector": "the feature terms' projectors are trainable modules of each student's Trainable, "
                 "built after the teacher side (engine/build.py setup_terms)",
    "student": "the model being trained: built after the teacher side from the same seed, so a sweep "
               "over students of one teacher shares the teacher forward too",
    "distill.*.projector": "a term's own projector (``${projector}`` by default): a partial called in the "
                           "term's setup, after the student is built",
    "distill.*.weight": "a term's weight multiplies its loss after both forwards; it is not a constructor "
                        "argument of the term (build_teacher_side keeps the weights apart)",
    "task.objectives": "how the loss terms are grouped into the balancer's objectives",
    "task.label_smoothing": "the task loss on the student's logits (mixup's own label smoothing is a key "
                            "of the data set)",
    "trainer.grad_clip": "the student's update",
    "trainer.nonfinite": "what the student's non-finite step does (a diverged student stops alone)",
    "trainer.max_nonfinite_streak": "when a diverged student stops",
    "trainer.grad_space": "where the student's per-objective gradients are taken",
    "trainer.jacobian": "how the student's per-objective gradients are taken",
    "trainer.grad_feature": "the student representation of grad_space=features",
    "trainer.compile": "torch.compile of the student (the teacher is never compiled)",
    "trainer.ema": "the moving average of each student's own weights",
    "trainer.resume": "each job's own run directory and checkpoint",
    "trainer.overwrite": "each job's own run directory",
    "trainer.save_last": "what each job writes",
    "trainer.save_best": "what each job writes",
    "logger": "what each job records about itself (log and diagnostics cadence, TensorBoard, metrics.jsonl)",
    "paper": "the paper-table cell a job reproduces: read by kdrun tables only",
}


def matches(path: Sequence[str], pattern: str) -> bool:
    """Whether ``pattern`` (dotted, ``*`` = any one key) is ``path`` or a node above it."""
    keys = pattern.split(".")
    return len(path) >= len(keys) and all(k in ("*", p) for k, p in zip(keys, path))


def student_side(path: Sequence[str]) -> bool:
    """Whether the config value at ``path`` may differ between the jobs of a group."""
    return any(matches(path, pattern) for pattern in STUDENT_SIDE)


def leaves(node: Any, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Every leaf of a plain config (dicts nested; a list is one leaf: its order and length matter)."""
    if isinstance(node, Mapping) and node:
        out: dict[tuple[str, ...], Any] = {}
        for key, value in node.items():
            out.update(leaves(value, (*path, str(key))))
        return out
    return {path: node}


def plain(cfg: Any) -> Any:
    """``cfg`` as plain containers, interpolations resolved (``${dataset.num_classes}`` compares as its
    value); a config that cannot be resolved compares unresolved (validation then refuses that job)."""
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(cfg, DictConfig):
        return cfg
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 — any resolver error: compare the text, the job fails on its own later
        return OmegaConf.to_container(cfg, resolve=False)


def data_side(cfg: Any) -> dict[str, Any]:
    """The leaves that must be equal for two jobs to share: every path that is not student-side."""
    return {".".join(path): value for path, value in leaves(plain(cfg)).items() if not student_side(path)}


def sharing_key(cfg: Any) -> str:
    """Equal for two configs exactly when they may share (canonical JSON of :func:`data_side`)."""
    return json.dumps(data_side(cfg), sort_keys=True, default=str)


def group_jobs(cfgs: Sequence[Any]) -> list[list[int]]:
    """The jobs (indices into ``cfgs``, each a job's composed task config) that share, in sweep order,
    groups ordered by their first job. Jobs with equal data sides form one group."""
    return groups_by_key([sharing_key(cfg) for cfg in cfgs])


def groups_by_key(keys: Sequence[str | None]) -> list[list[int]]:
    """Indices with equal keys form a group (in order, groups ordered by their first index); ``None``: a job
    that runs alone."""
    groups: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key if key is not None else ("alone", i), []).append(i)
    return list(groups.values())


def differences(a: Any, b: Any) -> list[str]:
    """The data-side paths whose values differ between two configs (why two jobs do not share)."""
    da, db = data_side(a), data_side(b)
    return sorted(k for k in da.keys() | db.keys() if da.get(k, _MISSING) != db.get(k, _MISSING))


_MISSING = object()
