"""A tap never changes after it is taken (kdrun.models.taps): in-place ops that run later in the forward
do not overwrite it, for every tap kind (module output, ``:input``, declared FEATURE_TAPS), in grad,
no-grad and inference mode; untouched taps stay the model's own tensors (gradients reach the model)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdrun.models import cifar
from kdrun.models.taps import Tapped


class InPlaceNet(nn.Module):
    """bn -> ReLU(inplace) -> conv, then ``out += 1`` on the conv output after it is tapped."""

    FEATURE_TAPS = {"declared": "bn"}

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 3)
        self.add_in_place = True

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(self.act(self.bn(self.conv0(x))))
        if self.add_in_place:
            h += 1.0
        return self.fc(h.mean(dim=(2, 3)))

    def reference(self, x: Tensor) -> dict[str, Tensor]:
        """The tensors as computed, before any later in-place op."""
        b = self.bn(self.conv0(x))
        return {"bn": b, "act:input": b, "declared": b, "conv1": self.conv1(F.relu(b))}


MODES = ["grad", "no_grad", "inference"]


def _ctx(mode: str):
    return {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference": torch.inference_mode}[mode]()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("training", [False, True])
def test_taps_survive_later_in_place_ops(mode: str, training: bool) -> None:
    torch.manual_seed(0)
    net = InPlaceNet().train(training)
    with torch.no_grad():
        net.bn.bias.fill_(-0.2)  # plenty of negatives for the in-place ReLU to destroy
    taps = ["bn", "act:input", "declared", "conv1"]
    tapped = Tapped(net, taps)
    x = torch.randn(4, 2, 6, 6)
    for _ in range(3):  # probe forward, then the learned copy-at-hook-time path
        with _ctx(mode):
            out = tapped(x)
        with torch.no_grad():
            ref = net.reference(x)
        for t in taps:
            torch.testing.assert_close(out.features[t], ref[t], msg=t)
        assert bool((out.features["bn"] < 0).any())


def test_untouched_taps_keep_their_identity_and_gradients() -> None:
    """A tap no in-place op touches is the model's own tensor, so d(task loss)/d(tap) is defined (the
    feature-space Jacobian, trainer.grad_space=features, needs exactly that)."""
    torch.manual_seed(0)
    net = InPlaceNet()
    net.add_in_place = False
    tapped = Tapped(net, ["conv1", "bn"])
    x = torch.randn(2, 2, 5, 5)
    for _ in range(2):
        out = tapped(x)
        g = torch.autograd.grad(out.logits.sum(), out.features["conv1"], retain_graph=True)[0]
        assert g.abs().sum() > 0
    assert "conv1" not in tapped._copy_taps and "bn" in tapped._copy_taps
    # the modified tap (a copy) still carries gradient to the parameters before it
    out = tapped(x)
    (gb,) = torch.autograd.grad(out.features["bn"].sum(), net.bn.bias)
    torch.testing.assert_close(gb, torch.full_like(gb, 2 * 5 * 5.0))


def test_resnet56_block_bn_tap_is_pre_relu() -> None:
    """The issue's case: layer3.0.bn1 of the zoo's resnet56 is followed by an in-place ReLU."""
    torch.manual_seed(0)
    model = cifar.resnet56().eval()
    with torch.no_grad():
        model.layer3[0].bn1.bias.fill_(-0.1)
    captured: dict[str, Tensor] = {}
    model.layer3[0].conv1.register_forward_hook(lambda m, i, o: captured.__setitem__("conv", o.clone()))
    tapped = Tapped(model, ["layer3.0.bn1", "layer3.0.relu:input"])
    x = torch.randn(2, 3, 32, 32)
    for _ in range(2):
        with torch.inference_mode():
            out = tapped(x)
        with torch.no_grad():
            ref = model.layer3[0].bn1(captured["conv"])
        torch.testing.assert_close(out.features["layer3.0.bn1"], ref)
        torch.testing.assert_close(out.features["layer3.0.relu:input"], ref)
        assert bool((ref < 0).any())


def test_timm_inplace_relu_input_tap_is_pre_relu() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=5).train()
    captured: dict[str, Tensor] = {}
    model.layer1[0].bn1.register_forward_hook(lambda m, i, o: captured.__setitem__("bn1", o.clone()))
    tapped = Tapped(model, ["layer1.0.act1:input"])
    x = torch.randn(2, 3, 32, 32)
    for _ in range(2):
        out = tapped(x)
        torch.testing.assert_close(out.features["layer1.0.act1:input"], captured["bn1"])
        assert bool((out.features["layer1.0.act1:input"] < 0).any())


def test_a_late_in_place_op_warns() -> None:
    """If a tap untouched in the first forward is modified later (control flow changed), that forward's
    value is lost: a RuntimeWarning says so, and later forwards copy the tap."""
    torch.manual_seed(0)
    net = InPlaceNet()
    net.add_in_place = False
    tapped = Tapped(net, ["conv1"])
    x = torch.randn(2, 2, 5, 5)
    tapped(x)
    net.add_in_place = True
    with pytest.warns(RuntimeWarning, match="modified in place"):
        tapped(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = tapped(x)
    with torch.no_grad():
        torch.testing.assert_close(out.features["conv1"], net.reference(x)["conv1"])


def test_the_frozen_teacher_copies_each_tap_once_into_an_ordinary_tensor() -> None:
    """Under inference mode a tap is copied when it is taken, outside inference mode, so the teacher call
    returns it as is (no second copy) and a loss may save it for backward; the logits are cloned out."""
    from kdrun.engine.teacher import Teacher

    torch.manual_seed(0)
    net = InPlaceNet()
    with torch.no_grad():
        net.bn.bias.fill_(-0.2)
    taps = ["bn", "act:input", "conv1"]
    teacher = Teacher(Tapped(net, taps), torch.device("cpu"), "fp32")
    copies: list[Tensor] = []
    real_keep = Tapped._keep

    def spy(self: Tapped, tap: str, t: Tensor) -> None:
        real_keep(self, tap, t)
        copies.append(self._store[tap])

    x = torch.randn(4, 2, 6, 6)
    Tapped._keep = spy  # type: ignore[method-assign]
    try:
        out = teacher(x)
    finally:
        Tapped._keep = real_keep  # type: ignore[method-assign]
    with torch.no_grad():
        ref = net.eval().reference(x)
    assert not out.logits.is_inference()
    for t, copy in zip(taps, copies):
        v = out.features[t]
        assert not v.is_inference(), t
        assert v is copy, f"{t} was copied again after the hook"
        torch.testing.assert_close(v, ref[t], msg=t)
    # Usable in autograd: a product with a parameter saves them for backward (inference tensors cannot be).
    w = torch.ones((), requires_grad=True)
    ((w * out.logits).sum() + (w * out.features["bn"]).sum()).backward()
    assert w.grad is not None
