"""Image classification: the cross-entropy task term, objective grouping, and top-k evaluation.

Task term ``ce``: cross-entropy with optional label smoothing, or soft-target cross-entropy when the
batch carries soft targets (mixup/cutmix produce them; label smoothing is then inside the mixup).

Objectives (the vector a balancer sees) are named groups of loss terms, summed within a group
(DTO-KD Eq. 1–2; MoKD Remark A.1 uses three). ``objectives: null`` means the default two:
``distill`` = every distillation term, ``task`` = ``ce``; with no distillation terms, ``task`` alone.
An explicit mapping such as ``{kl: [kl], feature: [smooth_l1], task: [ce]}`` must use every term
exactly once.
"""
from __future__ import annotations

from typing import Annotated, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdrun.config import ConfigError, Ge, Le
from kdrun.models.taps import ModelOutput


class Classification:
    task_terms = ("ce",)

    def __init__(self, label_smoothing: Annotated[float, Ge(0.0), Le(1.0)] = 0.0,
                 objectives: dict[str, list[str]] | None = None, topk: Sequence[int] = (1, 5)) -> None:
        self.label_smoothing = float(label_smoothing)
        self.objectives_spec = {k: list(v) for k, v in objectives.items()} if objectives else None
        self.topk = tuple(topk)

    # -- losses ----------------------------------------------------------------------------------
    def losses(self, s: ModelOutput, target: Tensor) -> dict[str, Tensor]:
        logits = s.logits.float()
        if target.ndim == 2:  # soft targets (mixup/cutmix)
            ce = torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
        else:
            ce = F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)
        return {"ce": ce}

    def objective_groups(self, distill_terms: Iterable[str]) -> dict[str, list[str]]:
        distill_terms = list(distill_terms)
        if self.objectives_spec is None:
            groups = {"distill": distill_terms} if distill_terms else {}
            groups["task"] = list(self.task_terms)
            return groups
        terms = distill_terms + list(self.task_terms)
        used = [t for ts in self.objectives_spec.values() for t in ts]
        unknown = sorted(set(used) - set(terms))
        missing = sorted(set(terms) - set(used))
        twice = sorted({t for t in used if used.count(t) > 1})
        if unknown or missing or twice:
            raise ConfigError(
                "task.objectives must use every loss term exactly once; terms are "
                f"{', '.join(terms)}" + (f"; unknown: {', '.join(unknown)}" if unknown else "")
                + (f"; unused: {', '.join(missing)}" if missing else "")
                + (f"; used twice: {', '.join(twice)}" if twice else "") + "."
            )
        return self.objectives_spec

    @staticmethod
    def group(terms: dict[str, Tensor], groups: dict[str, list[str]]) -> dict[str, Tensor]:
        return {name: sum(terms[t] for t in members) for name, members in groups.items()}  # type: ignore[misc]

    # -- evaluation ------------------------------------------------------------------------------
    def eval_counts(self, logits: Tensor, target: Tensor) -> Tensor:
        """Per-batch [n, correct@k for k in topk, summed CE] as a float64 tensor (summable across
        batches and ranks, so the reduction is exact)."""
        k = min(max(self.topk), logits.shape[-1])
        pred = logits.topk(k, dim=-1).indices
        hit = pred.eq(target[:, None])
        out = [torch.tensor(float(len(target)), device=logits.device, dtype=torch.float64)]
        for kk in self.topk:
            out.append(hit[:, :min(kk, k)].any(dim=-1).sum().double())
        out.append(F.cross_entropy(logits.float(), target, reduction="sum").double())
        return torch.stack(out)

    def eval_metrics(self, counts: Tensor) -> dict[str, float]:
        n = counts[0].item()
        m = {f"top{k}": 100.0 * counts[1 + i].item() / max(n, 1) for i, k in enumerate(self.topk)}
        m["loss"] = counts[-1].item() / max(n, 1)
        m["samples"] = int(n)
        return m
