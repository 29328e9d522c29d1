"""Helpers shared by the distillation terms: feature pooling, projector building, warm-up, logit
standardisation.

Kept private (``_common``) because they are implementation details of the terms in this package, not
part of the :class:`~kdrun.losses.base.DistillLoss` interface.
"""
from __future__ import annotations

from typing import Any, Callable, Literal, Sequence

from torch import Tensor, nn

from kdrun.losses.base import DistillLoss
from kdrun.projectors.identity import Identity

ProjectorFactory = Callable[..., nn.Module]


def pool_vector(x: Tensor) -> Tensor:
    """A feature as one vector per sample: ``[B, D]`` as is, ``[B, C, H, W]`` averaged over H, W,
    ``[B, N, D]`` (tokens) averaged over N — the pooling VkD applies to a CNN teacher / ViT student."""
    if x.dim() == 2:
        return x
    if x.dim() == 4:
        return x.mean(dim=(2, 3))
    if x.dim() == 3:
        return x.mean(dim=1)
    raise ValueError(f"cannot pool a feature of shape {tuple(x.shape)} to one vector per sample")


def vector_dim(shape: Sequence[int]) -> int:
    """The size of :func:`pool_vector`'s output for a per-sample ``shape`` (no batch dimension)."""
    shape = tuple(shape)
    if len(shape) == 1:
        return int(shape[0])
    if len(shape) == 3:  # (C, H, W)
        return int(shape[0])
    if len(shape) == 2:  # (N, D)
        return int(shape[1])
    raise ValueError(f"cannot pool a feature of per-sample shape {shape} to a vector")


def build_projector(factory: ProjectorFactory | None, student_dim: int, teacher_dim: int) -> nn.Module:
    """``factory(student_dim=..., teacher_dim=...)``, or the identity projector when ``factory`` is None
    (which raises a clear error if the dims differ)."""
    if factory is None:
        return Identity(student_dim=student_dim, teacher_dim=teacher_dim)
    return factory(student_dim=student_dim, teacher_dim=teacher_dim)


def as_taps(taps: Sequence[str] | str, what: str) -> tuple[str, ...]:
    """A tap list from a config value (ListConfig, list, tuple or one string)."""
    out = (str(taps),) if isinstance(taps, str) else tuple(str(t) for t in taps)
    if not out:
        raise ValueError(f"{what} must name at least one tap")
    return out


def standardize_logits(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """Each sample's logits z-scored over the classes (Sun et al., CVPR 2024, "Logit Standardization in
    Knowledge Distillation"): ``(z − mean(z)) / (eps + std(z))``, exactly the official ``normalize``
    (sunshangquan/logit-standardization-KD @ f6e5aa5, ``mdistiller/distillers/KD.py`` lines 7-10, the
    same in ``DKD.py`` lines 7-10): ``torch.std``'s default, the *unbiased* (C − 1) estimate, and ε = 1e-7
    added to the std (not under a square root). Constant logits (std 0) map to finite values (0 when the
    mean is exact) and torch's std backward is 0 there, so the gradient stays finite (1/ε times the
    centred upstream gradient, the derivative of d ↦ d / (ε + |d|) at 0)."""
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True)
    return (logits - mean) / (eps + std)


WarmupMode = Literal["epoch", "linear"]


def warmup_factor(progress_step: int, warmup_epochs: float, steps_per_epoch: int | None,
                  mode: WarmupMode = "epoch") -> float:
    """The loss warm-up factor at 0-based optimiser step ``progress_step``.

    ``"epoch"``: mdistiller's ``min(epoch / warmup_epochs, 1)`` with its 1-based epoch
    (distillers/DKD.py line 72, distillers/ReviewKD.py line 96; engine/trainer.py lines 78-86 count
    epochs from 1), a staircase constant within an epoch: epoch = progress_step // steps_per_epoch + 1.
    ``"linear"``: the same ramp per step, min((progress_step + 1) / (warmup_epochs · steps_per_epoch), 1).
    Never 0, so log-loss balancers never see log 0; ``warmup_epochs <= 0`` disables it."""
    if warmup_epochs <= 0:
        return 1.0
    if not steps_per_epoch or steps_per_epoch <= 0:
        raise RuntimeError("a loss warm-up stated in epochs needs the steps per epoch: the engine must call "
                           "bind(DataInfo(num_data, steps_per_epoch, labels)) before training "
                           "(or set warmup_epochs: 0).")
    step = int(progress_step)
    if mode == "epoch":
        return min((step // int(steps_per_epoch) + 1) / float(warmup_epochs), 1.0)
    if mode == "linear":
        return min((step + 1) / (float(warmup_epochs) * int(steps_per_epoch)), 1.0)
    raise ValueError(f"warm-up mode must be 'epoch' or 'linear', got {mode!r}")


def need_setup(module: nn.Module, built: Any) -> None:
    """Raise the same clear error from every term whose shape-dependent modules are missing."""
    if built is None:
        raise RuntimeError(f"{type(module).__name__}.setup(student_shapes, teacher_shapes) must be called "
                           "before the first forward (it builds the shape-dependent modules).")


def per_position(proj: nn.Module, zs: Tensor, zt: Tensor) -> tuple[Tensor, Tensor]:
    """Apply a vector projector to ``[B, C, H, W]`` maps position by position (as a 1x1 conv would):
    channels go last, the projector maps them, and the maps are put back."""
    if zs.dim() != 4:
        return proj(zs, zt)
    ps, pt = proj(zs.permute(0, 2, 3, 1), zt.permute(0, 2, 3, 1))
    return ps.permute(0, 3, 1, 2), pt.permute(0, 3, 1, 2)


class ProjectedFeatureLoss(DistillLoss):
    """Base of the projector-based feature-matching terms (VkD / MoKD): read one student and one teacher
    tap, pool each to a vector per sample, and map the pair through the projector built in
    :meth:`setup` (:meth:`projected`); subclasses compute their distance on the pair in ``forward``."""

    projector: nn.Module | None

    def _init_projected(self, projector: ProjectorFactory | None, student_tap: str, teacher_tap: str) -> None:
        self.projector_factory = projector
        self.student_tap = str(student_tap)
        self.teacher_tap = str(teacher_tap)
        self.student_taps = (self.student_tap,)
        self.teacher_taps = (self.teacher_tap,)
        self.projector = None

    def setup(self, student: dict[str, Any], teacher: dict[str, Any]) -> None:
        self.projector = build_projector(self.projector_factory, vector_dim(student[self.student_tap]),
                                         vector_dim(teacher[self.teacher_tap]))

    def projected(self, zs: Tensor, zt: Tensor) -> tuple[Tensor, Tensor]:
        need_setup(self, self.projector)
        assert self.projector is not None
        # The teacher carries no gradient into its network, but projector parameters on the teacher
        # side (MoKD's P_t) still get theirs, so the projector is applied after the detach.
        ps, pt = self.projector(pool_vector(zs).float(), pool_vector(zt).detach().float())
        return ps.float(), pt.float()  # the distance in fp32 whatever the autocast dtype
