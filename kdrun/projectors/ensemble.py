"""Projector ensemble (Chen et al., "Improved Feature Distillation via Projector Ensemble", NeurIPS
2022): ``num`` independently initialised projectors of one ``kind`` whose student outputs are averaged,

    z_s' = (1/num) Σ_k P_k(z_s),

which the authors show regularises the student's features better than a single projector. The teacher
feature is normalised once (``teacher_norm``); the members are built with ``teacher_norm="none"``.
Averaging orthogonal members gives a map that is no longer orthogonal, as in the paper's use of
unconstrained members.
"""
from __future__ import annotations

from typing import Annotated, Literal

import torch
from torch import Tensor, nn

from kdrun.config import Ge
from kdrun.projectors._common import TeacherNorm, check_teacher_norm, normalize_teacher
from kdrun.projectors.linear import Linear
from kdrun.projectors.mlp import MLP
from kdrun.projectors.orthogonal import Orthogonal

KINDS: dict[str, type[nn.Module]] = {"linear": Linear, "orthogonal": Orthogonal, "mlp": MLP}


class Ensemble(nn.Module):
    def __init__(self, student_dim: Annotated[int, Ge(1)], teacher_dim: Annotated[int, Ge(1)],
                 kind: Literal["linear", "orthogonal", "mlp"] = "linear", num: Annotated[int, Ge(1)] = 3,
                 teacher_norm: TeacherNorm = "none") -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} is not one of {', '.join(KINDS)}")
        self.members = nn.ModuleList(
            KINDS[kind](student_dim=student_dim, teacher_dim=teacher_dim, teacher_norm="none")
            for _ in range(int(num))
        )
        self.teacher_norm = check_teacher_norm(teacher_norm)

    def forward(self, zs: Tensor, zt: Tensor) -> tuple[Tensor, Tensor]:
        outs = [m(zs, zt)[0] for m in self.members]
        return torch.stack(outs).mean(0), normalize_teacher(zt, self.teacher_norm)
