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

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import orthogonal

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


OrthogonalMap = Literal["auto", "householder", "cayley", "matrix_exp", "qr"]


class _QRStiefel(nn.Module):
    """W = Q·diag(sign(diag R)) from the thin QR of an unconstrained A of the same shape.

    The sign fix makes the map smooth (wherever A has full rank) and the identity on matrices that
    already have orthonormal columns, so ``right_inverse`` can store W itself. A wide W (more columns
    than rows) is handled through its transpose (orthonormal rows).
    """

    def forward(self, a: Tensor) -> Tensor:
        wide = a.shape[0] < a.shape[1]
        m = a.mT if wide else a
        q, r = torch.linalg.qr(m, mode="reduced")
        q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones_like(torch.diagonal(r)))
        return q.mT if wide else q

    def right_inverse(self, w: Tensor) -> Tensor:
        return w


def stiefel(linear: nn.Linear, orthogonal_map: str = "auto") -> nn.Linear:
    """Constrain ``linear.weight`` to (semi-)orthogonal matrices, exactly at every step.

    ``"auto"``, ``"householder"``, ``"cayley"``, ``"matrix_exp"``: ``torch.nn.utils.parametrizations.
    orthogonal`` (``auto`` = torch's default: ``matrix_exp`` for square weights, ``householder``
    otherwise — what VkD's code gets). ``"qr"``: kdrun's thin-QR map (:class:`_QRStiefel`), the same
    manifold at O(n·k²) per forward; its backward avoids the per-reflector loop of the Householder one,
    which dominates the step for wide teachers (3024 × 192 for RegNetY-160 → DeiT-Ti: 9 s against 20 ms
    per forward + backward on this project's 2-core CPU). The parametrisations share the manifold but
    not the optimisation path: the gradient reaches W through different charts.
    """
    if orthogonal_map == "qr":
        nn.init.orthogonal_(linear.weight)
        parametrize.register_parametrization(linear, "weight", _QRStiefel())
        return linear
    if orthogonal_map not in ("auto", "householder", "cayley", "matrix_exp"):
        raise ValueError(f"orthogonal_map={orthogonal_map!r} is not one of auto, householder, cayley, "
                         "matrix_exp, qr")
    return orthogonal(linear, orthogonal_map=None if orthogonal_map == "auto" else orthogonal_map)
