"""VkD's detection distillation loss (Miles, Elezi & Deng, CVPR 2024), as its ViDT fork computes it:
the "VkD" rows of DTO-KD Table 3/5 and MoKD Table 1/4.

Source: github.com/roymiles/vkd, ``vidt/`` (commit 4b48050 "vidt training code"). Every choice below
follows that code:

* **Tokens** (``methods/vidt/detector.py`` lines 263-290, ``methods/vidt/criterion.py`` lines 284-331):
  the same three families as ViDT's token matching — the 4 multi-scale [PATCH] maps after ``input_proj``
  (``srcs``), the body's projected [DET] tokens (``det_tgt``) and the neck's [DET] tokens of every decoder
  output (``hs``, the body's first: kdrun's ``neck_det_tokens``). Each is flattened to rows ``[N, 256]``
  (``permute(0, 2, 3, 1).view(b*w*h, c)`` for [PATCH], ``view(b*d, c)`` for body, ``view(l*b*d, c)`` for
  the neck: **all decoder outputs form one set of rows**, standardised and averaged together).
  Padded [PATCH] positions count, as in the code.
* **Projectors** (``main.py`` lines 29-44 and 86-92): on the student side only (the teacher is built
  with ``has_projections = False``, line 101), one per [PATCH] scale (``patch_projector_1..4``), one for
  the body [DET] tokens, one for the neck [DET] tokens (shared by the decoder outputs); each an
  ``OrthogonalLinear``: a bias-free ``torch.nn.utils.parametrizations.orthogonal`` Linear, then a
  learnable per-channel scale (init 1) and bias (init 0) — kdrun's ``projector=orthogonal`` with
  ``affine=true, teacher_norm=none`` (``conf/distill/token_matching_vkd.yaml`` says which projector the
  recipes use; the projector group stays configurable). They train with the model (AdamW, the "head"
  group: lr 1e-4, weight decay 1e-4, ``main.py`` lines 140-165).
* **Standardisation** (``criterion.py`` lines 297-298, 310-311, 323-324): both student (after its
  projector) and teacher (detached) rows are standardised per channel over the rows (dim 0):
  ``(x - x.mean(0)) / x.std(0)`` — torch's default **unbiased** std (N − 1), **no eps**. (kdrun's
  ``teacher_norm=batchstd`` is a different thing: teacher only, biased variance, eps.) A channel that
  is constant over the rows divides by zero and gives a non-finite loss, as in VkD's code; the engine
  then skips the step. ``eps > 0`` (not VkD's) divides by ``std + eps`` instead.
  A side effect worth knowing: the projector's per-channel scale and bias are cancelled by the
  standardisation that follows (up to the sign of the scale), so they receive (numerically) zero
  gradient; they are kept because they are VkD's parameters.
* **Distance and reduction** (same lines 299, 312, 325): ``F.smooth_l1_loss(student, teacher)`` with its
  defaults — β = 1, mean over all N × 256 elements — per set of rows, **summed** over the 4 [PATCH]
  scales + body + neck (6 terms), with **no square root** (line 330's ``sqrt`` is commented out).
* **Weight** (``arguments.py`` line 134, ``detector.py`` line 391): ``--distil_loss_coef`` 4.0, the
  term's ``weight`` in kdrun.

Families can be switched off (``patch``/``body``/``neck``) for ablations; VkD uses all three.
"""
from __future__ import annotations

from typing import Annotated, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kdrun.config import Ge, Gt
from kdrun.losses._common import ProjectorFactory
from kdrun.losses.token_matching import TokenDistillLoss
from kdrun.models.taps import ModelOutput


def standardise_rows(z: Tensor, eps: float = 0.0) -> Tensor:
    """``(z - z.mean(0)) / z.std(0)`` per channel over the rows of ``[N, C]`` (unbiased std, VkD's
    ``criterion.py`` line 297); with ``eps > 0`` the divisor is ``std + eps``."""
    std = z.std(dim=0)
    return (z - z.mean(dim=0)) / (std + eps if eps > 0 else std)


def vkd_distance(zs: Tensor, zt: Tensor, beta: float = 1.0, eps: float = 0.0) -> Tensor:
    """Smooth-L1 (mean over elements) between the row-standardised student and teacher tokens."""
    return F.smooth_l1_loss(standardise_rows(zs, eps), standardise_rows(zt, eps), beta=beta)


class VkDDetection(TokenDistillLoss):
    """VkD's ViDT distillation loss; see the module docstring."""

    neck_per_layer = False  # view(l*b*d, c): the decoder outputs are one set of rows

    def __init__(self, projector: ProjectorFactory | None = None, patch: bool = True, body: bool = True,
                 neck: bool = True, beta: Annotated[float, Gt(0.0)] = 1.0,
                 eps: Annotated[float, Ge(0.0)] = 0.0) -> None:
        # one projector per [PATCH] scale, as VkD's patch_projector_1..4
        super().__init__(projector, patch, body, neck, patch_projectors="per_scale")
        self.beta = float(beta)
        self.eps = float(eps)

    def forward(self, s: ModelOutput, t: ModelOutput, target: Any = None) -> Tensor:
        total = torch.zeros((), device=s.logits.device)
        for f in self.families:
            for zs, zt in self.projected_pairs(f, s, t):
                total = total + vkd_distance(zs, zt, self.beta, self.eps)
        return total
