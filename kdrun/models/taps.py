"""Feature taps: read named intermediate tensors from any model without editing its code.

A *tap* is a name a loss or projector asks for (``"pre_logits"``, ``"stage2"``, ``"layer3.1"``). It is
resolved against the model in this order:

1. ``"logits"`` is the model's output itself;
2. ``"pre_logits"`` is the *input* of the model's classifier (``model.get_classifier()`` for timm
   models, else the module named by the model's ``CLASSIFIER`` attribute or one of ``fc``,
   ``classifier``, ``head``, ``linear``);
3. a name in the model's declared ``FEATURE_TAPS`` map (``{"stage2": "layer2"}``) is that module's
   output;
4. ``"dist_logits"`` is the distillation-token head's logits of timm's distilled DeiT;
   ``"patch_mean"`` is the mean of a timm ViT's final-norm patch tokens (prefix tokens — class,
   distillation, registers — excluded), the feature VkD (Miles & Deng 2024) distils from DeiT;
5. any other name is a dotted module path (``"layer3.1.conv2"``); a ``":input"`` suffix takes the
   module's input instead of its output.

Taps are captured with forward hooks, so they work for every ``nn.Module`` and under DDP.

A tap never changes after it is taken. A hook sees the tensor *object*, and an in-place op that runs
later in the forward (``nn.ReLU(inplace=True)`` after a tapped BatchNorm, the ``:input`` of such a ReLU,
``out += residual``) would overwrite it. So each tap is kept by reference and its version counter is
checked when the forward returns; the first forward also keeps a copy, and a tap whose tensor was
modified gets that copy and is copied at hook time from then on. Unmodified taps stay the very tensor
the model computed with, so a gradient w.r.t. a tap (``trainer.grad_space=features``) reaches the
model's own graph. Inference-mode tensors (the frozen teacher) carry no version counter and are always
copied, once, into ordinary tensors (the copy is made outside inference mode). Should a tap that was not modified in the first forward be modified later (a model whose
control flow changes), that forward's value is already lost: a ``RuntimeWarning`` says so and the tap
is copied from then on.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import Tensor, nn

CLASSIFIER_NAMES = ("fc", "classifier", "head", "linear")


@dataclass
class ModelOutput:
    """What a tapped model returns: its logits and the features that were asked for."""

    logits: Tensor
    features: dict[str, Tensor] = field(default_factory=dict)

    def detach(self) -> "ModelOutput":
        return ModelOutput(self.logits.detach(), {k: v.detach() for k, v in self.features.items()})


class TapError(ValueError):
    """A tap name that resolves to nothing in the model."""


def classifier_module(model: nn.Module) -> tuple[str, nn.Module]:
    """The model's final classifier, as (dotted name, module)."""
    getter = getattr(model, "get_classifier", None)
    if callable(getter):
        clf = getter()
        if isinstance(clf, (tuple, list)):  # distilled DeiT: (head, head_dist); the class head first
            clf = clf[0]
        for name, mod in model.named_modules():
            if mod is clf:
                return name, mod
    declared = getattr(model, "CLASSIFIER", None)
    for name in ([declared] if declared else []) + list(CLASSIFIER_NAMES):
        mod = _get(model, name)
        if mod is not None:
            return name, mod
    raise TapError(
        f"{type(model).__name__} has no recognisable classifier (looked for get_classifier(), "
        f"CLASSIFIER, {', '.join(CLASSIFIER_NAMES)}); declare CLASSIFIER = '<module path>' on the class "
        "or tap a module path instead of 'pre_logits'."
    )


def _get(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def resolve_tap(model: nn.Module, tap: str) -> tuple[str, bool]:
    """Resolve a tap name to (module path, take_input)."""
    if tap == "pre_logits":
        return classifier_module(model)[0], True
    declared: dict[str, str] = dict(getattr(model, "FEATURE_TAPS", {}) or {})
    path = declared.get(tap, tap)
    take_input = path.endswith(":input")
    path = path.removesuffix(":input")
    if _get(model, path) is None:
        choices = ["logits", "pre_logits", *declared]
        raise TapError(
            f"tap '{tap}' does not name a module of {type(model).__name__}; valid taps are "
            f"{', '.join(choices)} or any dotted module path (e.g. "
            f"{', '.join(n for n, _ in list(model.named_children())[:4])})."
        )
    return path, take_input


class Tapped(nn.Module):
    """Wrap ``model`` so that calling it returns :class:`ModelOutput` with the requested taps.

    The wrapped model is kept as ``self.model`` so that its state_dict keys are ``model.<...>``;
    :func:`kdrun.runtime.checkpoint` strips that prefix when exporting.
    """

    def __init__(self, model: nn.Module, taps: Iterable[str] = ()) -> None:
        super().__init__()
        self.model = model
        self._store: dict[str, Tensor] = {}
        # Per tap: (tensor as taken, its version then, a copy or None), checked when forward returns.
        self._watch: dict[str, tuple[Tensor, int, Tensor | None]] = {}
        self._copy_taps: set[str] = set()  # taps seen modified in place after they were taken
        self._probed: set[str] = set()     # taps whose first capture has been checked
        self._handles: list[Any] = []
        self.taps: tuple[str, ...] = ()
        self.set_taps(taps)

    def set_taps(self, taps: Iterable[str]) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._copy_taps, self._probed = set(), set()  # re-learn which taps in-place ops overwrite
        self.taps = tuple(dict.fromkeys(t for t in taps if t != "logits"))
        if "dist_logits" in self.taps:
            # DeiT's distillation-token head: timm returns (cls, dist) logits in training mode only
            # after set_distilled_training(True); in eval mode it returns their average, as DeiT does.
            if not hasattr(self.model, "set_distilled_training"):
                raise TapError(f"tap 'dist_logits' needs a model with a distillation token (timm's "
                               f"deit_*_distilled_*); {type(self.model).__name__} has none.")
            self.model.set_distilled_training(True)
        for tap in self.taps:
            if tap == "dist_logits":
                continue
            if tap == "patch_mean":
                norm = getattr(self.model, "norm", None)
                prefix = getattr(self.model, "num_prefix_tokens", None)
                if not isinstance(norm, nn.Module) or prefix is None:
                    raise TapError(f"tap 'patch_mean' needs a timm ViT (a `norm` module and "
                                   f"`num_prefix_tokens`); {type(self.model).__name__} is not one.")
                self._handles.append(norm.register_forward_hook(self._patch_mean_hook(int(prefix))))
                continue
            path, take_input = resolve_tap(self.model, tap)
            module = self.model.get_submodule(path)
            if take_input:
                self._handles.append(module.register_forward_pre_hook(self._pre_hook(tap)))
            else:
                self._handles.append(module.register_forward_hook(self._hook(tap)))

    def _keep(self, tap: str, t: Any) -> None:
        """Store tap ``t`` so that a later in-place op cannot change it (module docstring)."""
        if not isinstance(t, Tensor):
            self._store[tap] = t
        elif t.is_inference():
            # No version counter to watch, so always a copy; made outside inference mode, it is an ordinary
            # tensor that autograd may save, and the caller (the frozen teacher) need not copy it again.
            with torch.inference_mode(False):
                self._store[tap] = t.clone()
        elif tap in self._copy_taps:
            self._store[tap] = t.clone()
        else:
            self._store[tap] = t
            self._watch[tap] = (t, t._version, t.clone() if tap not in self._probed else None)

    def _settle(self) -> None:
        """After the forward: swap in the copy of every tap that was modified after it was taken."""
        for tap, (t, version, copy) in self._watch.items():
            if self._store.get(tap) is t and t._version != version:
                self._copy_taps.add(tap)
                if copy is not None:
                    self._store[tap] = copy
                else:
                    warnings.warn(f"tap '{tap}' was modified in place after it was taken, which its first "
                                  "forward did not do; this forward's value is the modified one, later "
                                  "forwards copy it when it is taken.", RuntimeWarning, stacklevel=3)
            self._probed.add(tap)
        self._watch = {}

    def _hook(self, tap: str):
        def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
            self._keep(tap, out[0] if isinstance(out, (tuple, list)) else out)

        return hook

    def _patch_mean_hook(self, prefix: int):
        def hook(_m: nn.Module, _inp: Any, out: Tensor) -> None:
            if out.ndim == 3:  # (B, tokens, D); fc_norm-style pooled outputs are 2-D and skipped
                self._store["patch_mean"] = out[:, prefix:].mean(dim=1)

        return hook

    def _pre_hook(self, tap: str):
        def hook(_m: nn.Module, inp: Any) -> None:
            self._keep(tap, inp[0] if isinstance(inp, (tuple, list)) else inp)

        return hook

    def forward(self, x: Any) -> ModelOutput:
        self._store, self._watch = {}, {}
        out = self.model(x)
        self._settle()
        if isinstance(out, ModelOutput):  # models that return their own features (ViDT's tokens)
            merged = ModelOutput(out.logits, {**out.features, **self._store})
            self._store = {}
            return merged
        if isinstance(out, (tuple, list)):
            # timm's distilled DeiT returns (cls_logits, dist_logits) in training mode.
            logits, extra = out[0], out[1:]
            feats = dict(self._store)
            if extra:
                feats["dist_logits"] = extra[0]
        else:
            logits, feats = out, dict(self._store)
        self._store = {}
        return ModelOutput(logits, feats)


def freeze(model: nn.Module) -> nn.Module:
    """Freeze a teacher: eval mode, no parameter needs grad."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@torch.no_grad()
def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
