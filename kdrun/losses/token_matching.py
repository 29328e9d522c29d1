"""ViDT's token-matching distillation (Song et al., "An Extendable, Efficient and Effective Transformer-based
Object Detector" (ViDT+), 2022, §3.4; the "Token-Matching" baseline of DTO-KD Table 3 / MoKD Table 1, and
L_distill = L_patch + L_neck + L_head of MoKD Appendix A Eq. 2).

The student mimics the teacher's tokens that ViDT hands from one component to the next:

* ``patch``: the 4 projected multi-scale [PATCH] maps (strides 8/16/32/64, 256-d, the neck's memory);
* ``body``: the body's projected [DET] tokens (the decoder's input queries);
* ``neck``: the [DET] embeddings of every decoder output (the body's and each layer's: what the heads read).

With d(u, v) = ‖u − v‖₂ per token and E the mean over all tokens of a family (batch × positions),
the release's criterion (``methods/vidt/criterion.py``, ``loss_distil``) is

    L_tm = sqrt( Σ_{s=1..4} E_patch_s[d] + E_body[d] + Σ_{l=0..L} E_neck_l[d] ),

the square root of the summed mean L2 distances (the neck's per-layer means are summed: the release
takes the mean over all layers × their number). Its coefficient is 4.0 (``--distil_loss_coef``); in kdrun
that is the term's ``weight`` (``conf/distill/token_matching.yaml``). Padded [PATCH] positions count, as
in the release.

``projector`` (the projector config group's partial) is applied per token family — one projector for
the [PATCH] tokens of all scales, one for the body [DET] tokens, one for the neck [DET] tokens — on the
flattened tokens (``[N, 256]``), like the other feature terms; the release compares the tokens as they
are, which is ``projector=identity`` (both 256-d). The teacher side never carries a gradient into the
teacher (its projector parameters still get theirs, as in :class:`~kdrun.losses._common.ProjectedFeatureLoss`).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from kdrun.losses._common import ProjectorFactory, build_projector, need_setup
from kdrun.losses.base import DistillLoss, tap
from kdrun.models.taps import ModelOutput

PATCH_TAPS = tuple(f"patch_tokens_{i}" for i in range(4))
FAMILIES = ("patch", "body", "neck")


def _tokens(x: Tensor, family: str) -> Tensor:
    """One family's tokens as ``[N, D]`` rows (channels last)."""
    if family == "patch":  # [B, C, H, W] → [B·H·W, C]
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    return x.reshape(-1, x.shape[-1])  # [B, Q, D] or [B, L, Q, D] → [·, D]


def mean_l2(zs: Tensor, zt: Tensor) -> Tensor:
    """E_tokens ‖zs − zt‖₂ over the rows of ``[N, D]`` tensors."""
    return torch.linalg.vector_norm(zs - zt, dim=-1).mean()


class TokenMatching(DistillLoss):
    """ViDT token matching; see the module docstring."""

    student_taps = (*PATCH_TAPS, "body_det_tokens", "neck_det_tokens")
    teacher_taps = student_taps

    def __init__(self, projector: ProjectorFactory | None = None, patch: bool = True, body: bool = True,
                 neck: bool = True) -> None:
        super().__init__()
        self.projector_factory = projector
        self.families = tuple(f for f, on in zip(FAMILIES, (patch, body, neck)) if on)
        if not self.families:
            raise ValueError("token matching needs at least one of patch, body, neck")
        self.projectors: nn.ModuleDict | None = None

    def setup(self, student: dict[str, Any], teacher: dict[str, Any]) -> None:
        dims = {"patch": (student[PATCH_TAPS[0]][0], teacher[PATCH_TAPS[0]][0]),
                "body": (student["body_det_tokens"][-1], teacher["body_det_tokens"][-1]),
                "neck": (student["neck_det_tokens"][-1], teacher["neck_det_tokens"][-1])}
        for name in ("body_det_tokens", "neck_det_tokens"):
            s, t = tuple(student[name])[:-1], tuple(teacher[name])[:-1]
            if s != t:
                raise ValueError(f"token matching compares {name} one to one, but the student has {s} and the "
                                 f"teacher {t} (number of decoder outputs, [DET] tokens); build both with the "
                                 "same det_tokens and dec_layers.")
        self.projectors = nn.ModuleDict({f: build_projector(self.projector_factory, int(dims[f][0]), int(dims[f][1]))
                                         for f in self.families})

    def _family(self, family: str, s: ModelOutput, t: ModelOutput) -> Tensor:
        assert self.projectors is not None
        proj = self.projectors[family]
        if family == "patch":
            pairs = [(tap(s, n), tap(t, n)) for n in PATCH_TAPS]
        elif family == "body":
            pairs = [(tap(s, "body_det_tokens"), tap(t, "body_det_tokens"))]
        else:  # one mean per decoder output, summed
            pairs = list(zip(tap(s, "neck_det_tokens").unbind(1), tap(t, "neck_det_tokens").unbind(1)))
        total = torch.zeros((), device=s.logits.device)
        for xs, xt in pairs:
            if xs.shape != xt.shape:
                raise ValueError(f"token matching: student {family} tokens {tuple(xs.shape)} vs teacher "
                                 f"{tuple(xt.shape)}; they are matched one to one (same input, same "
                                 "det_tokens).")
            zs, zt = proj(_tokens(xs, family).float(), _tokens(xt, family).detach().float())
            total = total + mean_l2(zs.float(), zt.float())
        return total

    def forward(self, s: ModelOutput, t: ModelOutput, target: Any = None) -> Tensor:
        need_setup(self, self.projectors)
        total = sum(self._family(f, s, t) for f in self.families)
        # the clamp only matters when student and teacher tokens coincide exactly, where sqrt's
        # infinite slope would turn the zero gradient of the distances into NaN
        return torch.sqrt(total.clamp_min(1e-12))  # type: ignore[union-attr]
