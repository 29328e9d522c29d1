"""Linear projector: z_s ↦ W z_s + b, W ∈ ℝ^{n_t × n_s}, into the teacher's feature space.

The plain regressor of feature distillation (FitNets' fully-connected hint regressor; the "linear"
projector of Miles & Mikolajczyk, AAAI 2024 and of VkD's projector comparison). The teacher feature is
only normalised (``teacher_norm``), never projected.
"""
from __future__ import annotations

from typing import Annotated

from torch import Tensor, nn

from kdrun.config import Ge
from kdrun.projectors._common import TeacherNorm, check_teacher_norm, normalize_teacher


class Linear(nn.Module):
    def __init__(self, student_dim: Annotated[int, Ge(1)], teacher_dim: Annotated[int, Ge(1)],
                 bias: bool = True, teacher_norm: TeacherNorm = "none") -> None:
        super().__init__()
        self.proj = nn.Linear(student_dim, teacher_dim, bias=bias)
        self.teacher_norm = check_teacher_norm(teacher_norm)

    def forward(self, zs: Tensor, zt: Tensor) -> tuple[Tensor, Tensor]:
        return self.proj(zs), normalize_teacher(zt, self.teacher_norm)
