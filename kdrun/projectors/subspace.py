"""Subspace projector (MoKD: Hayder, Cheraghian, Petersson & Harandi, "MoKD: Multi-Task Optimization
for Knowledge Distillation", §3.2).

Student and teacher features are mapped into a common n-dimensional space by two projections with
orthonormal columns, P_s ∈ St(n, n_s) ⊂ ℝ^{n×n_s} and P_t ∈ St(n, n_t) ⊂ ℝ^{n×n_t} (n ≥ max(n_s, n_t);
``n=None`` takes that maximum), and compared through a learnable diagonal metric D = diag(d), d ∈ ℝⁿ,
initialised to ones and left unconstrained so that it may become *indefinite* (negative entries) — the
paper's "indefinite space", which VkD's single positive-definite orthogonal map cannot express:

    s(z_t, z_s) = (P_t z_t)ᵀ D (P_s z_s).

Notation note: the paper writes s = z_tᵀ P_tᵀ D P_sᵀ z_s with P_s ∈ St(n, n_s), which does not type-check
(P_sᵀ z_s needs z_s ∈ ℝⁿ). We implement the only consistent reading, P_s z_s ∈ ℝⁿ, i.e. both
projections map *into* the common space, matching "learning in a common n dimensional latent space via
two projections" and Algorithm 1's ẑ_t, ẑ_s.

For the feature losses this module returns (D P_s z_s, P_t ẑ_t), where ẑ_t is the teacher feature after
``teacher_norm``; their inner product is s, and a distance between them (smooth-L1, normalised L1) is
the distillation loss. P_t is trained too; it is an isometry (‖P_t z‖ = ‖z‖), so the teacher target
cannot shrink to zero. Orthonormality is exact at every step (``orthogonal_map``: the chart, see
:func:`kdrun.projectors._common.stiefel`).

``metric="identity"`` fixes D = I (a buffer, not trained): the two subspaces alone, without the learnable
metric. MoKD's Fig. 2 caption calls D the part used "for alignment"; kdrun reads MoKD Table 3's
"High-dimensional Alignment" column as this metric (the COCO ablation recipes: off = ``identity``).
"""
from __future__ import annotations

from typing import Annotated, Literal

import torch
from torch import Tensor, nn

from kdrun.config import Ge
from kdrun.projectors._common import OrthogonalMap, TeacherNorm, check_teacher_norm, normalize_teacher, stiefel


class Subspace(nn.Module):
    def __init__(self, student_dim: Annotated[int, Ge(1)], teacher_dim: Annotated[int, Ge(1)],
                 n: Annotated[int, Ge(1)] | None = None, teacher_norm: TeacherNorm = "layernorm",
                 orthogonal_map: OrthogonalMap = "auto", metric: Literal["learned", "identity"] = "learned") -> None:
        super().__init__()
        n_min = max(student_dim, teacher_dim)
        n = n_min if n is None else int(n)
        if n < n_min:
            raise ValueError(f"subspace projector: n={n} must be >= max(student_dim={student_dim}, "
                             f"teacher_dim={teacher_dim}) so that P_s and P_t have orthonormal columns.")
        self.n = n
        # nn.Linear(in, out) holds an (out × in) = (n × n_dim) weight: orthonormal columns since n ≥ n_dim.
        self.p_s = stiefel(nn.Linear(student_dim, n, bias=False), orthogonal_map)
        self.p_t = stiefel(nn.Linear(teacher_dim, n, bias=False), orthogonal_map)
        if metric not in ("learned", "identity"):
            raise ValueError(f"subspace projector: metric={metric!r} is not one of learned, identity")
        self.d: Tensor
        if metric == "learned":
            self.d = nn.Parameter(torch.ones(n))  # the diagonal of D, stored as a vector so it stays diagonal
        else:
            self.register_buffer("d", torch.ones(n))
        self.teacher_norm = check_teacher_norm(teacher_norm)

    @property
    def P_s(self) -> Tensor:  # noqa: N802 — the paper's symbol
        """P_s ∈ ℝ^{n×n_s} with orthonormal columns."""
        return self.p_s.weight

    @property
    def P_t(self) -> Tensor:  # noqa: N802 — the paper's symbol
        """P_t ∈ ℝ^{n×n_t} with orthonormal columns."""
        return self.p_t.weight

    def forward(self, zs: Tensor, zt: Tensor) -> tuple[Tensor, Tensor]:
        return self.d * self.p_s(zs), self.p_t(normalize_teacher(zt, self.teacher_norm))

    def similarity(self, zs: Tensor, zt: Tensor) -> Tensor:
        """s(z_t, z_s) = (P_t ẑ_t)ᵀ D (P_s z_s), one value per row."""
        a, b = self(zs, zt)
        return (a * b).sum(-1)
