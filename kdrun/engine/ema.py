"""The exponential moving average of the student's weights (``trainer.ema``), kept by timm's ``ModelEmaV3``.

**What is averaged: the student alone**, not the projectors or loss modules of the :class:`Trainable`: the
evaluated and exported model is the student. Parameters *and* buffers: ``ModelEmaV3.apply_update_``
(timm 1.0.31 ``timm/utils/model_ema.py`` L310-328) lerps every floating-point entry of the state_dict —
BatchNorm's running mean and variance too — and copies the integer ones (``num_batches_tracked``), as
DeiT's ``ModelEma`` (timm's v1, which DeiT's main.py imports) does.

**When: after every finite optimiser step**, with ``step=`` the number of optimiser steps taken so far (this
one included): timm's ``train.py`` counts ``num_updates += 1`` and then calls ``update_ema(step=num_updates)``
(huggingface/pytorch-image-models@aa4b585 ``train.py`` L1391-1393); DeiT calls ``model_ema.update(model)``
after each ``loss_scaler`` step (facebookresearch/deit@7e160fe ``engine.py`` L71-72). A skipped non-finite
step takes no optimiser step, so it does not update the EMA either (DeiT stops the run there instead, L58-60).
``ModelEmaV3.get_decay`` (L251-268) gives decay 0 at step 1 — the EMA starts as the weights after the first
step — and ``trainer.ema.decay`` after it, or with ``trainer.ema.warmup`` 1 − (1 + n/γ)^−p for n = step − 1,
capped at the decay.

**Where it is made**: from the bare student once it is built and on its device, before DDP or
``torch.compile`` (DeiT's main.py L334-341: "create EMA model after cuda() ... but before SyncBN and DDP
wrapper"), and updated from that bare student, whose weights DDP keeps equal on every rank: every rank
updates its own EMA identically (buffers follow each rank's own BatchNorm statistics, as the raw student's
do unless ``trainer.sync_batchnorm``), and it is evaluated as the raw student is, every val sample once over
the ranks.

**Resume**: the checkpoint holds the EMA's bare-student state_dict and its update count
(:meth:`StudentEma.state_dict`), so a resumed run continues the same average bit for bit. The EMA draws no
random numbers (its stochastic rounding is for bfloat16 EMA tensors only; the student's are fp32 under
every ``trainer.precision``, which is autocast), so a run with it trains exactly as one without.
"""
from __future__ import annotations

from typing import Any

from timm.utils import ModelEmaV3

from kdrun.config import EmaConfig
from kdrun.models.taps import Tapped

# The hook tables of an nn.Module, each keyed by the hook handle's id.
HOOK_TABLES = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")


class StudentEma:
    """``ModelEmaV3`` of the student (``module``: a :class:`Tapped` with no taps around the averaged copy,
    so that evaluation calls it as it calls the student), its update count, and its checkpoint state."""

    def __init__(self, student: Tapped, config: EmaConfig) -> None:
        # A tapless wrapper around the student's own model: ModelEmaV3 deep-copies it. The copy keeps the
        # student's tap hooks (closures over the student's Tapped, which would receive the EMA's features),
        # so they are removed from it by their handles' ids.
        tap_hooks = {h.id for h in student._handles}
        self.ema = ModelEmaV3(Tapped(student.model), decay=config.decay, use_warmup=config.warmup,
                              warmup_gamma=config.warmup_gamma, warmup_power=config.warmup_power)
        for m in self.ema.module.modules():
            for table in HOOK_TABLES:
                hooks = getattr(m, table, None)
                for i in tap_hooks & set(hooks or ()):
                    del hooks[i]
        self.module.requires_grad_(False)  # never trained: autograd keeps no graph of it
        own, theirs = list(self.module.state_dict()), list(student.state_dict())
        if own != theirs:  # ModelEmaV3 pairs the two state_dicts by position
            raise ValueError(f"the EMA copy's state_dict keys differ from the student's: {own[:3]} vs {theirs[:3]}")
        self.updates = 0  # finite optimiser steps averaged in (ModelEmaV3's `step`)

    @property
    def module(self) -> Tapped:
        return self.ema.module  # type: ignore[no-any-return]

    @property
    def decay(self) -> float:
        """The decay the last update used (``ModelEmaV3.get_decay`` of the update count)."""
        return float(self.ema.get_decay(self.updates))

    def update(self, student: Tapped) -> None:
        """Average in the student after a finite optimiser step."""
        self.updates += 1
        self.ema.update(student, step=self.updates)

    def state_dict(self) -> dict[str, Any]:
        """``student``: the averaged bare student (the keys of the checkpoint's ``student``, so ``kdrun export
        --ema`` and ``student.checkpoint`` read it as the raw one); ``updates``: the update count."""
        return {"student": self.module.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.model.load_state_dict(state["student"])
        self.updates = int(state["updates"])


def ema_metrics(metrics: dict[str, float], keys: tuple[str, ...] | list[str]) -> dict[str, float]:
    """``{ema_<k>: value}`` for each of the task's metric keys: the EMA's entries of a history row."""
    return {f"ema_{k}": metrics[k] for k in keys}

