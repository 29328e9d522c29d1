"""OFD: A Comprehensive Overhaul of Feature Distillation (Heo, Kim, Yun, Park, Kwak & Choi, ICCV 2019).

At each tapped stage j a connector r_j (1x1 conv + BN, He-normal init) maps the student's feature to
the teacher's channels, and the teacher's *pre-ReLU* feature T is first passed through the margin ReLU
σ_m(T) = max(T, m) with the per-channel margin m = E[T | T < 0]. The partial L2 distance ignores
positions where the student is already below a negative target:

    d_p(T, S) = Σ_pos (σ_m(T) − S)² · 1[S > σ_m(T) or σ_m(T) > 0],
    ℓ = (1/B) Σ_i Σ_j d_p(T_j,i, r_j(S_j,i)) / 2^{L−1−j},

with later stages weighted more (L stages), the teacher map average-pooled to the student's size, and
the per-sample sum averaged over the batch — exactly mdistiller's ``feat_loss(...).mean(0).sum()``.
Benchmark term weight: 1e-3 (mdistiller ``CFG.OFD.LOSS.FEAT_WEIGHT``, the official CIFAR code's
``/ 1000``).

Features (mdistiller ``distillers/OFD.py`` lines 130-138): the student's and the teacher's
*pre-activation* stage features, ``preact_feats[1:]``, i.e. the taps ``preact_stage1..`` of the CIFAR
zoo (the default ``student_taps``/``teacher_taps``).

Margin (``margin``):

* ``bn`` (default): mdistiller's ``init_ofd_modules`` (lines 90-109, ``get_margin_from_BN`` of the
  official code): per channel of the teacher's BatchNorm before the ReLU (γ, β), with s = |γ|, m = β,
  margin = m − s·φ(m/s)/Φ(−m/s) (the mean of N(m, s²) below 0) where Φ(−m/s) > 0.001, else −3s.
  The BNs are the teacher's ``BN_BEFORE_RELU`` module paths (RepDistiller/mdistiller
  ``get_bn_before_relu``, declared by the CIFAR zoo's ResNets, WRNs and VGGs) or ``teacher_bn``; the
  term reads them in :meth:`bind_teacher`, **which the engine must call** with the frozen teacher
  before training (a forward without it raises). With s = 0 the formula's limit is used (min(m, 0)),
  where the reference divides by zero.
* ``estimate``: for teachers without such a BN (ShuffleNets, timm models): the running mean of the
  teacher's negative responses per channel, E[T | T < 0] without the Gaussian assumption, accumulated
  over the training forwards with autograd (buffers ``neg_sum_j``/``neg_count_j``, saved in checkpoints;
  a no-grad re-evaluation of a batch does not count it twice). On post-ReLU taps it is 0.
"""
from __future__ import annotations

import math
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdrun.losses._common import as_taps, need_setup
from kdrun.losses.base import DistillLoss, tap
from kdrun.models.taps import ModelOutput, Tapped


def connector(s_channels: int, t_channels: int) -> nn.Sequential:
    """OFD's connector: 1x1 conv (no bias, N(0, 2/(k²·C_out))) + BatchNorm (γ = 1, β = 0)."""
    conv = nn.Conv2d(s_channels, t_channels, kernel_size=1, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / t_channels))
    bn = nn.BatchNorm2d(t_channels)
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)
    return nn.Sequential(conv, bn)


def bn_margin(weight: Tensor, bias: Tensor) -> Tensor:
    """Per-channel OFD margin from a BatchNorm's affine parameters (mdistiller ``distillers/OFD.py``
    lines 90-109): E[x | x < 0] for x ~ N(β, γ²) where P(x < 0) > 0.001, else −3|γ|; float64 inside, as
    the reference computes it in Python floats."""
    s = weight.detach().double().abs()
    m = bias.detach().double()
    cdf = torch.special.ndtr(-m / s)  # Φ(−m/s); s = 0 gives ±inf or nan, handled below
    pdf = torch.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi)
    margin = torch.where(cdf > 0.001, -s * pdf / cdf + m, -3 * s)
    # s = 0 (a dead channel): the formula's limit, min(m, 0) (the reference raises ZeroDivisionError).
    margin = torch.where(s == 0, m.clamp(max=0), margin)
    return margin.float()


def ofd_stage_loss(source: Tensor, target: Tensor, margin: Tensor) -> Tensor:
    """Partial L2 with the margin ReLU, summed per sample and averaged over the batch."""
    m = margin.to(source).view(1, -1, 1, 1)
    target = torch.maximum(target, m)
    mask = (source > target) | (target > 0)
    return ((source - target).pow(2) * mask).flatten(1).sum(1).mean()


class OFD(DistillLoss):
    def __init__(self, student_taps: Sequence[str] = ("preact_stage1", "preact_stage2", "preact_stage3"),
                 teacher_taps: Sequence[str] = ("preact_stage1", "preact_stage2", "preact_stage3"),
                 margin: Literal["bn", "estimate"] = "bn", teacher_bn: Sequence[str] | None = None) -> None:
        super().__init__()
        self.student_taps = as_taps(student_taps, "student_taps")
        self.teacher_taps = as_taps(teacher_taps, "teacher_taps")
        if len(self.student_taps) != len(self.teacher_taps):
            raise ValueError("OFD pairs stages: student_taps and teacher_taps must have the same length")
        self.margin_source = margin
        self.teacher_bn = None if teacher_bn is None else as_taps(teacher_bn, "teacher_bn")
        if self.teacher_bn is not None and len(self.teacher_bn) != len(self.teacher_taps):
            raise ValueError(f"distill.ofd.teacher_bn names {len(self.teacher_bn)} BatchNorms for "
                             f"{len(self.teacher_taps)} teacher_taps; give one per tap")
        self.connectors: nn.ModuleList | None = None
        self.bn_margins: list[Tensor] | None = None  # margin=bn: from bind_teacher(), one per stage

    def bind_teacher(self, teacher: nn.Module) -> None:
        """Read the margins from the teacher's BatchNorms (``margin: bn``). ``teacher`` is the frozen
        teacher model (a :class:`~kdrun.models.taps.Tapped` is unwrapped)."""
        if self.margin_source != "bn":
            return
        model = teacher.model if isinstance(teacher, Tapped) else teacher
        paths = self.teacher_bn
        if paths is None:
            declared = tuple(getattr(model, "BN_BEFORE_RELU", ()) or ())
            if len(declared) != len(self.teacher_taps):
                raise ValueError(
                    f"distill.ofd.margin=bn needs one teacher BatchNorm per teacher tap; "
                    f"{type(model).__name__} declares {len(declared)} (BN_BEFORE_RELU) for "
                    f"{len(self.teacher_taps)} taps. Give distill.ofd.teacher_bn=[module paths], or use "
                    "distill.ofd.margin=estimate (valid choices: bn, estimate).")
            paths = declared
        margins = []
        for path in paths:
            try:
                bn = model.get_submodule(path)
            except AttributeError:
                raise ValueError(f"distill.ofd.teacher_bn: '{path}' is not a module of "
                                 f"{type(model).__name__}") from None
            if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.weight is None:
                raise ValueError(f"distill.ofd: teacher module '{path}' is {type(bn).__name__}, not an affine "
                                 "BatchNorm; use distill.ofd.margin=estimate")
            margins.append(bn_margin(bn.weight, bn.bias))
        self.bn_margins = margins

    def setup(self, student: dict[str, Any], teacher: dict[str, Any]) -> None:
        conns = []
        for j, (a, b) in enumerate(zip(self.student_taps, self.teacher_taps)):
            s_shape, t_shape = tuple(student[a]), tuple(teacher[b])
            if len(s_shape) != 3 or len(t_shape) != 3:
                raise ValueError(f"OFD needs [C, H, W] feature maps; taps {a}/{b} give {s_shape}/{t_shape}")
            conns.append(connector(int(s_shape[0]), int(t_shape[0])))
            c = int(t_shape[0])
            self.register_buffer(f"neg_sum_{j}", torch.zeros(c, dtype=torch.float64))
            self.register_buffer(f"neg_count_{j}", torch.zeros(c, dtype=torch.float64))
        self.connectors = nn.ModuleList(conns)

    def margin(self, j: int) -> Tensor:
        """Stage j's per-channel margin: from the teacher's BN (``bn``), or the current estimate
        E[T | T < 0] (``estimate``; 0 where no negatives were seen)."""
        if self.margin_source == "bn":
            if self.bn_margins is None:
                raise RuntimeError("distill.ofd.margin=bn: the margins come from the teacher's BatchNorms, "
                                   "but bind_teacher(teacher) was not called before the forward.")
            return self.bn_margins[j]
        total, count = getattr(self, f"neg_sum_{j}"), getattr(self, f"neg_count_{j}")
        return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total)).float()

    @torch.no_grad()
    def _observe(self, j: int, ft: Tensor) -> None:
        neg = ft.double().clamp(max=0)
        getattr(self, f"neg_sum_{j}").add_(neg.sum(dim=(0, 2, 3)))
        getattr(self, f"neg_count_{j}").add_((ft < 0).sum(dim=(0, 2, 3)).double())

    def forward(self, s: ModelOutput, t: ModelOutput, target: Tensor) -> Tensor:
        need_setup(self, self.connectors)
        assert self.connectors is not None
        n = len(self.student_taps)
        losses = []
        for j, (a, b) in enumerate(zip(self.student_taps, self.teacher_taps)):
            fs = self.connectors[j](tap(s, a)).float()
            ft = tap(t, b).detach().float()
            if self.margin_source == "estimate" and self.training and torch.is_grad_enabled():
                self._observe(j, ft)  # not in a no-grad re-evaluation of the batch
            ft = F.adaptive_avg_pool2d(ft, fs.shape[-2:])
            losses.append(ofd_stage_loss(fs, ft, self.margin(j)) / 2 ** (n - j - 1))
        return torch.stack(losses).sum()
