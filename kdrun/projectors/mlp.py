"""Two-layer MLP projector: z_s ↦ W₂ ReLU(BN(W₁ z_s + b₁)) + b₂.

The non-linear projector of common feature-distillation code (e.g. SimReg, Navaneet et al. BMVC 2021,
and the "MLP" row of VkD's / MoKD's projector comparisons): Linear → BatchNorm1d → ReLU → Linear.
``hidden_dim`` defaults to the teacher dimension. Inputs of any leading shape (``[B, D]`` pooled
features, ``[B, N, D]`` tokens) are flattened to rows for the batch norm, so its statistics are over
all rows, not over the token axis.
"""
from __future__ import annotations

from typing import Annotated

from torch import Tensor, nn

from kdrun.config import Ge
from kdrun.projectors._common import TeacherNorm, check_teacher_norm, normalize_teacher


class MLP(nn.Module):
    def __init__(self, student_dim: Annotated[int, Ge(1)], teacher_dim: Annotated[int, Ge(1)],
                 hidden_dim: Annotated[int, Ge(1)] | None = None, batchnorm: bool = True,
                 teacher_norm: TeacherNorm = "none") -> None:
        super().__init__()
        hidden = int(hidden_dim) if hidden_dim is not None else teacher_dim
        self.net = nn.Sequential(
            nn.Linear(student_dim, hidden, bias=not batchnorm),  # a BN right after makes the bias redundant
            nn.BatchNorm1d(hidden) if batchnorm else nn.Identity(),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, teacher_dim),
        )
        self.teacher_norm = check_teacher_norm(teacher_norm)

    def forward(self, zs: Tensor, zt: Tensor) -> tuple[Tensor, Tensor]:
        lead = zs.shape[:-1]
        out = self.net(zs.reshape(-1, zs.shape[-1]))
        return out.reshape(*lead, out.shape[-1]), normalize_teacher(zt, self.teacher_norm)
