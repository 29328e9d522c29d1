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
"""
from __future__ import annotations

from typing import Annotated

from torch import Tensor, nn

from kdrun.config import Ge
from kdrun.projectors._common import OrthogonalMap, TeacherNorm, check_teacher_norm, normalize_teacher, stiefel


class Orthogonal(nn.Module):
    def __init__(self, student_dim: Annotated[int, Ge(1)], teacher_dim: Annotated[int, Ge(1)],
                 teacher_norm: TeacherNorm = "layernorm", orthogonal_map: OrthogonalMap = "auto") -> None:
        super().__init__()
        self.proj = stiefel(nn.Linear(student_dim, teacher_dim, bias=False), orthogonal_map)
        self.teacher_norm = check_teacher_norm(teacher_norm)

    @property
    def weight(self) -> Tensor:
        """The current (semi-)orthogonal map W, shape (teacher_dim, student_dim)."""
        return self.proj.weight

    def forward(self, zs: Tensor, zt: Tensor) -> tuple[Tensor, Tensor]:
        return self.proj(zs), normalize_teacher(zt, self.teacher_norm)
