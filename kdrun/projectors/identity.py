"""The identity projector: features are compared as they are (dims must match)."""
from __future__ import annotations

from torch import Tensor, nn


class ProjectorDimError(ValueError):
    """Student and teacher features of different sizes with no projector to map them."""


class Identity(nn.Module):
    def __init__(self, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        if student_dim != teacher_dim:
            raise ProjectorDimError(
                f"student feature dim {student_dim} != teacher feature dim {teacher_dim} and the "
                "projector is identity; pick a projector that maps them (projector=linear, "
                "orthogonal, mlp, subspace)."
            )

    def forward(self, zs: Tensor, zt: Tensor) -> tuple[Tensor, Tensor]:
        return zs, zt
