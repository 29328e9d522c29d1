"""Pieces shared by the projectors: the teacher-side normalisation option.

Every projector in this package (except :class:`~kdrun.projectors.identity.Identity`, which compares
features as they are) takes ``teacher_norm``, applied to the teacher feature before the loss sees it:

* ``"none"``: the teacher feature as it is;
* ``"layernorm"``: layer norm over the feature dimension without affine parameters — what VkD (Miles,
  Elezi & Deng, CVPR 2024) applies to the pooled RegNetY-160 teacher feature, so that a projected
  student is matched to a scale-free target;
* ``"batchstd"``: standardisation of every feature over the batch (all leading dimensions), with the
  biased variance and ``eps`` of a ``BatchNorm`` without affine parameters — what VkD's detection code
  does. Batch statistics are used in training *and* evaluation, since the teacher feature is always
  available; the biased variance keeps the result unchanged when a batch is duplicated.
"""
from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

TeacherNorm = Literal["none", "layernorm", "batchstd"]
TEACHER_NORMS: tuple[str, ...] = ("none", "layernorm", "batchstd")


def normalize_teacher(z: Tensor, mode: str, eps: float = 1e-5) -> Tensor:
    """Apply the ``teacher_norm`` option ``mode`` over the last (feature) dimension of ``z``."""
    if mode == "none":
        return z
    if mode == "layernorm":
        return F.layer_norm(z, z.shape[-1:], eps=eps)
    if mode == "batchstd":
        dims = tuple(range(z.dim() - 1))  # every dimension but the feature one
        mean = z.mean(dim=dims, keepdim=True)
        var = z.var(dim=dims, keepdim=True, unbiased=False)
        return (z - mean) / (var + eps).sqrt()
    raise ValueError(f"teacher_norm={mode!r} is not one of {', '.join(TEACHER_NORMS)}")


def check_teacher_norm(mode: str) -> str:
    """Fail at construction (not at the first step) on a bad ``teacher_norm`` from Python code."""
    if mode not in TEACHER_NORMS:
        raise ValueError(f"teacher_norm={mode!r} is not one of {', '.join(TEACHER_NORMS)}")
    return mode
