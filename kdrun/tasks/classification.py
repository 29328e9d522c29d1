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

from typing import Annotated, Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdrun.config import Ge, Le
from kdrun.runtime.distributed import all_reduce_sum
from kdrun.models.taps import ModelOutput
from kdrun.tasks.base import objective_groups


class Classification:
    task_terms = ("ce",)
    primary_metric = "top1"
    metric_keys = ("top1", "top5", "loss")
    collate_fn = None
    results_path = None  # classification saves no predictions (Task.results_path)

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
        return objective_groups(self.task_terms, self.objectives_spec, list(distill_terms))

    # -- batches ---------------------------------------------------------------------------------
    def batch_to_device(self, batch: Sequence[Any], device: torch.device) -> tuple[Tensor, Tensor, Tensor | None]:
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        idx = batch[2].to(device, non_blocking=True) if len(batch) > 2 else None
        return x, y, idx

    @staticmethod
    def batch_size(inputs: Tensor) -> int:
        return len(inputs)

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

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, loader: Any, device: torch.device,
                 autocast_ctx: Callable[[], Any], channels_last: bool = False) -> dict[str, float]:
        """Top-k accuracy and mean CE over every val sample exactly once, summed across ranks."""
        was_training = model.training
        model.eval()
        counts = torch.zeros(2 + len(self.topk), dtype=torch.float64, device=device)
        with torch.inference_mode():
            for batch in loader:
                x, y, _ = self.batch_to_device(batch, device)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast_ctx():
                    out = model(x)
                logits = out.logits if isinstance(out, ModelOutput) else out
                counts += self.eval_counts(logits.float(), y)
        model.train(was_training)
        return self.eval_metrics(all_reduce_sum(counts))
