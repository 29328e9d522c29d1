"""KD-SVD: Self-supervised Knowledge Distillation using Singular Value Decomposition (Lee, Kim & Song,
ECCV 2018), as ported to PyTorch by mdistiller (the implementation the cross-batch KD paper's Table 1
runs).

For each tapped stage j, every sample's feature map is reshaped to a matrix X_j and decomposed,
X_j = U Σ Vᵀ. The teacher keeps its first k right singular vectors, the student its first k + 3, and
each teacher vector is paired with the student vector of largest |cosine|, sign-aligned ("align_rsv").
Vectors are L2-normalised and scaled by the teacher's normalised singular values. Between consecutive
stages (j−1, j) a Gaussian-kernel relation is formed element-wise,

    G_j[a, b, r] = exp(−(v_j[a, r] − v_{j−1}[b, r])² / 8),

and the loss is ℓ = Σ_{j ≥ 2} (1/B) Σ_i ‖G_j^s − G_j^t‖²_F (non-finite entries dropped), i.e. a per-sample
sum averaged over the batch: batch-size invariant and zero when student maps equal the teacher's.
Defaults: k = 1, taps stage1–stage3 (mdistiller's ``feats[1:]``), term weight 1.

``layout`` picks what X_j is:

* ``"mdistiller"`` (default): mdistiller reshapes an NCHW map to (C·H) × W, so the singular vectors
  live on the *width* axis. It is what the benchmark numbers come from, and it works across networks
  of different widths (only the spatial sizes of paired stages must match).
* ``"paper"``: the original TensorFlow code's NHWC reshape, (H·W) × C, so the vectors live on the
  *channel* axis; paired stages of student and teacher must then have equal channel counts, and the
  student needs at least k + 3 channels.

The SVD runs in fp32. Its gradient is undefined when singular values repeat (a rank-deficient map has
several zero ones); the reference code then returns NaN gradients, here such a sample contributes no
gradient for that step (the loss value is unaffected).
"""
from __future__ import annotations

from typing import Annotated, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdrun.config import Ge
from kdrun.losses._common import as_taps
from kdrun.losses.base import DistillLoss, tap
from kdrun.models.taps import ModelOutput


def _finite(x: Tensor) -> Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _drop_nonfinite_samples(grad: Tensor) -> Tensor:
    """SVD's backward divides by σ_i² − σ_j² for *all* pairs, so a repeated singular value (e.g. several
    zero ones of a rank-deficient map), even among the unused vectors, makes that sample's gradient NaN —
    in the reference code too. Such samples contribute no gradient instead of poisoning the step."""
    bad = ~torch.isfinite(grad).flatten(1).all(dim=1)
    return torch.where(bad.view(-1, 1, 1), torch.zeros_like(grad), grad)


def _svd(feat: Tensor, n: int, layout: str) -> tuple[Tensor, Tensor]:
    """(normalised first-n singular values [B, n], normalised first-n right singular vectors [B, ·, n])."""
    b, c, h, w = feat.shape
    if layout == "mdistiller":
        x = feat.reshape(b, c * h, w)
    else:
        x = feat.permute(0, 2, 3, 1).reshape(b, h * w, c)
    x = x.float()
    if x.requires_grad:
        x.register_hook(_drop_nonfinite_samples)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    s, v = _finite(s), _finite(vh.transpose(-2, -1))
    return F.normalize(s[:, :n], dim=1), F.normalize(v[:, :, :n], dim=1)


def _align(a: Tensor, b: Tensor) -> Tensor:
    """For each column of b, the column of a with the largest |cosine|, with the sign of that cosine."""
    cosine = a.transpose(-2, -1) @ b
    best = cosine.abs().amax(dim=1, keepdim=True)
    mask = torch.where(cosine.abs() == best, torch.sign(cosine), torch.zeros_like(cosine))
    return a @ mask


def kdsvd_loss(g_s: Sequence[Tensor], g_t: Sequence[Tensor], k: int, layout: str = "mdistiller") -> Tensor:
    """Σ over consecutive stage pairs of the per-sample squared RBF-relation difference, batch mean."""
    losses = []
    prev_s = prev_t = None
    for fs, ft in zip(g_s, g_t):
        s_t, v_t = _svd(ft.detach(), k, layout)
        _, v_s = _svd(fs, k + 3, layout)
        if v_s.shape[1] != v_t.shape[1]:
            raise ValueError(
                "KDSVD: the singular vectors of paired student/teacher stages differ in length "
                f"({v_s.shape[1]} vs {v_t.shape[1]}); with layout={layout!r} the paired stages must match "
                f"in {'width' if layout == 'mdistiller' else 'channels'}.")
        v_s = _align(v_s, v_t)
        scale = s_t.unsqueeze(1)
        v_t, v_s = v_t * scale, v_s * scale
        if prev_s is not None and prev_t is not None:
            s_rbf = torch.exp(-(v_s.unsqueeze(2) - prev_s.unsqueeze(1)).pow(2) / 8)
            t_rbf = torch.exp(-(v_t.unsqueeze(2) - prev_t.unsqueeze(1)).pow(2) / 8)
            losses.append(_finite((s_rbf - t_rbf.detach()).pow(2)).sum() / fs.shape[0])
        prev_s, prev_t = v_s, v_t
    if not losses:
        raise ValueError("KDSVD relates consecutive stages: give at least two taps")
    return torch.stack(losses).sum()


class KDSVD(DistillLoss):
    def __init__(self, student_taps: Sequence[str] = ("stage1", "stage2", "stage3"),
                 teacher_taps: Sequence[str] = ("stage1", "stage2", "stage3"),
                 k: Annotated[int, Ge(1)] = 1, layout: Literal["mdistiller", "paper"] = "mdistiller") -> None:
        super().__init__()
        self.student_taps = as_taps(student_taps, "student_taps")
        self.teacher_taps = as_taps(teacher_taps, "teacher_taps")
        if len(self.student_taps) != len(self.teacher_taps) or len(self.student_taps) < 2:
            raise ValueError("KDSVD needs the same number (>= 2) of student_taps and teacher_taps")
        self.k = int(k)
        self.layout = layout

    def forward(self, s: ModelOutput, t: ModelOutput, target: Tensor) -> Tensor:
        return kdsvd_loss([tap(s, n) for n in self.student_taps], [tap(t, n) for n in self.teacher_taps],
                          self.k, self.layout)
