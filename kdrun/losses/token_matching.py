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

``projector`` (the projector config group's partial) is applied on the flattened tokens (``[N, 256]``),
like the other feature terms: one projector for the body [DET] tokens, one for the neck [DET] tokens
(all decoder outputs), and for the [PATCH] tokens ``patch_projectors="per_scale"`` (default) builds one
projector per scale — DTO-KD Fig. 2's "multiple light-weight projectors at different scales", and what
VkD's ViDT code does (roymiles/vkd ``vidt/main.py`` lines 86-92: ``patch_projector_1..4``) — while
``"shared"`` maps all four scales through one (kdrun's behaviour before; its state_dict key stays
``projectors.patch``). The release compares the tokens as they are, which is ``projector=identity``
(both 256-d; then the two options coincide). The teacher side never carries a gradient into the
teacher (its projector parameters still get theirs, as in :class:`~kdrun.losses._common.ProjectedFeatureLoss`).

:class:`TokenDistillLoss` holds what this term shares with VkD's detection loss
(:mod:`kdrun.losses.vkd_detection`): the taps, the layout checks, the projectors and the token pairs.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from kdrun.losses._common import ProjectorFactory, build_projector, need_setup
from kdrun.losses.base import DistillLoss, tap
from kdrun.models.taps import ModelOutput

PATCH_TAPS = tuple(f"patch_tokens_{i}" for i in range(4))
FAMILIES = ("patch", "body", "neck")
PatchProjectors = Literal["per_scale", "shared"]


def _tokens(x: Tensor, family: str) -> Tensor:
    """One family's tokens as ``[N, D]`` rows (channels last)."""
    if family == "patch":  # [B, C, H, W] → [B·H·W, C]
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    return x.reshape(-1, x.shape[-1])  # [B, Q, D] or [B, L, Q, D] → [·, D]


def mean_l2(zs: Tensor, zt: Tensor) -> Tensor:
    """E_tokens ‖zs − zt‖₂ over the rows of ``[N, D]`` tensors."""
    return torch.linalg.vector_norm(zs - zt, dim=-1).mean()


class TokenDistillLoss(DistillLoss):
    """Base of the ViDT token distillation terms: taps, layout checks, projectors, projected token pairs.

    Subclasses set ``neck_per_layer`` (whether every decoder output is its own pair or all of them are
    one set of tokens) and reduce the pairs of :meth:`projected_pairs` in ``forward``.
    """

    student_taps = (*PATCH_TAPS, "body_det_tokens", "neck_det_tokens")
    teacher_taps = student_taps
    neck_per_layer = True

    def __init__(self, projector: ProjectorFactory | None = None, patch: bool = True, body: bool = True,
                 neck: bool = True, patch_projectors: PatchProjectors = "per_scale") -> None:
        super().__init__()
        self.projector_factory = projector
        self.families = tuple(f for f, on in zip(FAMILIES, (patch, body, neck)) if on)
        if not self.families:
            raise ValueError(f"{type(self).__name__} needs at least one of patch, body, neck")
        if patch_projectors not in ("per_scale", "shared"):
            raise ValueError(f"patch_projectors={patch_projectors!r} is not one of per_scale, shared")
        self.patch_projectors = patch_projectors
        self.projectors: nn.ModuleDict | None = None

    def projector_keys(self, family: str) -> list[str]:
        """The projector of each pair of a family, in pair order (``patch_<i>`` per scale or ``patch``)."""
        if family == "patch":
            return ([f"patch_{i}" for i in range(len(PATCH_TAPS))] if self.patch_projectors == "per_scale"
                    else ["patch"] * len(PATCH_TAPS))
        return [family]

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
        self.projectors = nn.ModuleDict({
            k: build_projector(self.projector_factory, int(dims[f][0]), int(dims[f][1]))
            for f in self.families for k in dict.fromkeys(self.projector_keys(f))})

    def projected_pairs(self, family: str, s: ModelOutput, t: ModelOutput) -> list[tuple[Tensor, Tensor]]:
        """The family's (student, teacher) token pairs as projected fp32 ``[N, D]`` rows; the teacher is
        detached before its projector."""
        need_setup(self, self.projectors)
        assert self.projectors is not None
        if family == "patch":
            pairs = [(tap(s, n), tap(t, n)) for n in PATCH_TAPS]
        elif family == "body":
            pairs = [(tap(s, "body_det_tokens"), tap(t, "body_det_tokens"))]
        elif self.neck_per_layer:
            pairs = list(zip(tap(s, "neck_det_tokens").unbind(1), tap(t, "neck_det_tokens").unbind(1)))
        else:
            pairs = [(tap(s, "neck_det_tokens"), tap(t, "neck_det_tokens"))]
        keys = self.projector_keys(family)  # one per [PATCH] scale, or one for the whole family
        keys = keys if len(keys) == len(pairs) else keys * len(pairs)
        out = []
        for key, (xs, xt) in zip(keys, pairs):
            if xs.shape != xt.shape:
                raise ValueError(f"{type(self).__name__}: student {family} tokens {tuple(xs.shape)} vs teacher "
                                 f"{tuple(xt.shape)}; they are matched one to one (same input, same "
                                 "det_tokens).")
            zs, zt = self.projectors[key](_tokens(xs, family).float(), _tokens(xt, family).detach().float())
            out.append((zs.float(), zt.float()))
        return out


class TokenMatching(TokenDistillLoss):
    """ViDT token matching; see the module docstring."""

    def forward(self, s: ModelOutput, t: ModelOutput, target: Any = None) -> Tensor:
        total = torch.zeros((), device=s.logits.device)
        for f in self.families:
            for zs, zt in self.projected_pairs(f, s, t):
                total = total + mean_l2(zs, zt)
        # the clamp only matters when student and teacher tokens coincide exactly, where sqrt's
        # infinite slope would turn the zero gradient of the distances into NaN
        return torch.sqrt(total.clamp_min(1e-12))
