"""The student's EMA (``trainer.ema``, :mod:`kdrun.engine.ema`) inside the real step: the averaged weights
against the textbook recursion with timm's per-update decay written out by hand, no update on a skipped
step, the tap hooks left with the student, and the config's refusals."""
from __future__ import annotations

import inspect

import pytest
import torch
from timm.utils import ModelEmaV3
from torch import Tensor

from kdrun.balancers.fixed import Fixed
from kdrun.config import ConfigError, EmaConfig, validate
from kdrun.engine.ema import StudentEma
from kdrun.engine.step import KDStep
from tests.conftest import compose_cfg
from tests.engine._parts import NaNAtStep, batches, make_step


def decay_at(n: int, c: EmaConfig) -> float:
    """ModelEmaV3.get_decay(step=n) written out (timm 1.0.31 timm/utils/model_ema.py L251-268, with
    update_after_step=0, min_decay=0): 0 on the first update, then decay, or with warmup
    1 − (1 + (n − 1)/γ)^−p capped at decay."""
    if n <= 1:
        return 0.0
    return min(c.decay, 1 - (1 + (n - 1) / c.warmup_gamma) ** -c.warmup_power) if c.warmup else c.decay


def assert_close(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    """Floats to 1e-6 (lerp and the recursion round differently), integers exactly."""
    assert got.keys() == want.keys()
    for k, v in got.items():
        if v.is_floating_point():
            assert torch.allclose(v.double(), want[k], rtol=0, atol=1e-6), k
        else:
            assert torch.equal(v, want[k]), k


def recursion(snapshots: list[dict[str, Tensor]], decays: list[float]) -> dict[str, Tensor]:
    """e ← d·e + (1 − d)·s over the student's state after each update, in float64; integer entries
    (BatchNorm's num_batches_tracked) are the student's own."""
    ema = {k: v.double() if v.is_floating_point() else v for k, v in snapshots[0].items()}
    for snap, d in zip(snapshots, decays):
        ema = {k: d * ema[k] + (1 - d) * v.double() if v.is_floating_point() else v for k, v in snap.items()}
    return ema


def with_ema(step: KDStep, config: EmaConfig) -> StudentEma:
    """The step of the tiny parts with an EMA, as :func:`kdrun.engine.run.make_step` passes ``parts.ema``."""
    step.ema = StudentEma(step.trainable.student, config)
    return step.ema


def train(step: KDStep, n: int) -> list[tuple[bool, dict[str, Tensor]]]:
    """``n`` steps; each step's finiteness and the student's state after it (what the EMA averages)."""
    out = []
    for i, batch in enumerate(batches(n)):
        finite = step(batch, i).finite
        out.append((finite, {k: v.detach().clone() for k, v in step.trainable.student.state_dict().items()}))
    return out


@pytest.mark.parametrize("config", [EmaConfig(decay=0.8), EmaConfig(decay=0.95, warmup=True, warmup_power=0.9)],
                         ids=["fixed", "warmup"])
def test_ema_is_the_recursion_with_timms_decay_per_update(config: EmaConfig) -> None:
    step = make_step(Fixed(), lr=0.3)
    ema = with_ema(step, config)
    states = train(step, 6)
    decays = [decay_at(n, config) for n in range(1, 7)]
    if config.warmup:  # the warm-up is what this case tests: the decays still rise at the sixth update
        assert decays[1] < decays[2] < decays[5] < config.decay
    assert ema.updates == 6 and ema.decay == decays[-1]
    want = recursion([s for _, s in states], decays)
    got = ema.module.state_dict()
    assert any("running_var" in k for k in got)  # BatchNorm buffers averaged too
    assert_close(got, want)
    # ...and it is an average, not the student: the last step moved the student away from it.
    assert not torch.allclose(got["model.fc.weight"], step.trainable.student.state_dict()["model.fc.weight"])


def test_a_skipped_step_does_not_update_the_ema() -> None:
    config = EmaConfig(decay=0.7, warmup=True)
    step = make_step(Fixed(), extra={"nan": NaNAtStep([2, 3])}, lr=0.3)
    ema = with_ema(step, config)
    states = train(step, 6)
    assert [f for f, _ in states] == [True, True, False, False, True, True]
    assert ema.updates == 4 and step.skipped == 2  # the update count (warm-up's `step`) counts finite steps
    finite = [s for f, s in states if f]
    assert_close(ema.module.state_dict(), recursion(finite, [decay_at(n, config) for n in range(1, 5)]))


def test_the_ema_copy_leaves_the_students_taps_alone() -> None:
    """ModelEmaV3 deep-copies the student, hooks included; the tap hooks (closures over the student's
    Tapped) are removed from the copy, so its forward neither fills the student's taps nor gets any."""
    step = make_step(Fixed())
    student = step.trainable.student
    ema = with_ema(step, EmaConfig(decay=0.5))
    x = batches(1)[0][0]
    student.eval()  # as the EMA copy is (ModelEmaV3 keeps it in eval mode): BatchNorm on running statistics
    with torch.no_grad():
        s = student(x)
        student._store["sentinel"] = x  # the student's tap store between forwards: the EMA must not touch it
        e = ema.module(x)
    assert set(s.features) == {"pre_logits"} and e.features == {}
    assert set(student._store) == {"sentinel"}
    assert torch.equal(e.logits, s.logits)  # same weights before any update
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert {p.data_ptr() for p in ema.module.parameters()}.isdisjoint({p.data_ptr() for p in student.parameters()})


def test_ema_config_shape_defaults_are_model_ema_v3s() -> None:
    """EmaConfig's warm-up shape keys are ModelEmaV3's own defaults (kdrun.config's comment says so)."""
    params = inspect.signature(ModelEmaV3.__init__).parameters
    assert EmaConfig.warmup_gamma == params["warmup_gamma"].default
    assert EmaConfig.warmup_power == params["warmup_power"].default
    assert EmaConfig.warmup == params["use_warmup"].default


def test_ema_is_off_by_default_and_validated() -> None:
    assert validate(compose_cfg(["+debug=quick"])).trainer.ema is None
    on = validate(compose_cfg(["+debug=quick", "trainer.ema={decay:0.9,warmup:true}"])).trainer.ema
    assert on == EmaConfig(decay=0.9, warmup=True)
    assert validate(compose_cfg(["+debug=quick", "trainer.ema={}"])).trainer.ema == EmaConfig()


@pytest.mark.parametrize("override, message", [
    ("trainer.ema={decay:1.0}", "trainer.ema.decay=1.0 is out of range: it must be < 1.0."),
    ("trainer.ema={decay:0}", "trainer.ema.decay=0 is out of range: it must be > 0.0."),
    ("trainer.ema={warmup_power:-1}", "trainer.ema.warmup_power=-1 is out of range: it must be > 0.0."),
    ("trainer.ema={decy:0.9}", "trainer.ema.decy does not exist (did you mean trainer.ema.decay?)"),
    ("trainer.ema=0.9", "trainer.ema=0.9 must be null or a node with keys decay, warmup, warmup_gamma, "
                        "warmup_power (trainer.ema={} for the defaults"),
])
def test_bad_ema_settings_are_one_paragraph(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg(["+debug=quick", override]))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_a_teacher_fit_keeps_no_ema() -> None:
    """The fit's teacher file is its raw student; with an EMA its resume would also depend on the trainer.ema
    of whichever run resumes it (kdrun.engine.teacher.fit_config)."""
    from kdrun.engine.teacher import fit_config

    cfg = compose_cfg(["+recipe=quickstart", "trainer.ema={decay:0.9}"])
    assert validate(fit_config(cfg)).trainer.ema is None
