"""Orthogonal projector (VkD: Miles, Elezi & Deng, "VkD: Improving knowledge distillation using
orthogonal projections", CVPR 2024).

z_s ↦ W z_s with W ∈ ℝ^{n_t × n_s} constrained to the Stiefel manifold by
``torch.nn.utils.parametrizations.orthogonal``, bias-free:

* n_t ≥ n_s (the usual small student → wide teacher case): WᵀW = I, orthonormal columns — an
  isometric embedding of the student space, so the projector cannot rescale or collapse features and
  the student itself must carry the teacher's structure;
* n_t < n_s: WWᵀ = I, orthonormal rows (a semi-orthogonal projection onto n_t directions);
* n_t = n_s: W is orthogonal.

The constraint holds exactly throughout training (W is a function of unconstrained parameters), so a
plain optimiser (SGD, AdamW) can be used. ``orthogonal_map`` picks the chart (see
:func:`kdrun.projectors._common.stiefel`): ``auto`` is torch's default, as in VkD's code; ``qr`` is
the same constraint at a small fraction of the cost for wide teachers. VkD normalises the teacher with a non-affine layer norm for
the RegNet teacher, hence ``teacher_norm: layernorm`` in ``conf/projector/orthogonal.yaml``.

``affine=True`` is the projector of VkD's *detection* code (roymiles/vkd ``vidt/main.py`` lines 29-43,
``OrthogonalLinear``): the same bias-free Stiefel map followed by a learnable per-output scale (init 1)
and bias (init 0), z_s ↦ a ⊙ (W z_s) + b. VkD's ViDT loss standardises the projected tokens per channel
right after it (:mod:`kdrun.losses.vkd_detection`), which cancels a and b up to the sign of a: they are
kept because they are VkD's parameters, not because they change the loss.
"""
from __future__ import annotations

from typing import Annotated

import torch
from torch import Tensor, nn

from kdrun.config import Ge
from kdrun.projectors._common import OrthogonalMap, TeacherNorm, check_teacher_norm, normalize_teacher, stiefel


class Orthogonal(nn.Module):
    def __init__(self, student_dim: Annotated[int, Ge(1)], teacher_dim: Annotated[int, Ge(1)],
                 teacher_norm: TeacherNorm = "layernorm", orthogonal_map: OrthogonalMap = "auto",
                 affine: bool = False) -> None:
        super().__init__()
        self.proj = stiefel(nn.Linear(student_dim, teacher_dim, bias=False), orthogonal_map)
        self.teacher_norm = check_teacher_norm(teacher_norm)
        self.scale: nn.Parameter | None = None
        self.shift: nn.Parameter | None = None
        if affine:  # VkD's OrthogonalLinear: self.weight = ones(out_dim), self.bias = zeros(out_dim)
            self.scale = nn.Parameter(torch.ones(teacher_dim))
            self.shift = nn.Parameter(torch.zeros(teacher_dim))

    @property
    def weight(self) -> Tensor:
        """The current (semi-)orthogonal map W, shape (teacher_dim, student_dim)."""
        return self.proj.weight

    def forward(self, zs: Tensor, zt: Tensor) -> tuple[Tensor, Tensor]:
        ps = self.proj(zs)
        if self.scale is not None and self.shift is not None:
            ps = self.scale * ps + self.shift
        return ps, normalize_teacher(zt, self.teacher_norm)
