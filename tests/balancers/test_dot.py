"""DOT (kdrun/balancers/dot.py) against mdistiller's own optimiser: k steps of the engine's KDStep with
balancer=dot and a plain SGD equal k steps of ``DistillationOrientedTrainer`` driven as mdistiller's DOT trainer
drives it, on the same tiny model and batches; the momentum buffers round-trip a state_dict mid-way; a
non-finite step leaves them as they were; a run that would double the momentum is refused at config time."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, List, Optional

import pytest
import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, required

from kdrun.balancers.dot import DOT
from kdrun.config import ConfigError, validate
from kdrun.engine.build import Parts, build_trainable
from kdrun.engine.run import make_step as engine_make_step
from kdrun.engine.step import KDStep, StepSettings
from kdrun.engine.teacher import Teacher
from kdrun.losses.base import DistillLoss
from kdrun.losses.kl import KL
from kdrun.models.taps import Tapped
from kdrun.runtime.checkpoint import TrainState
from kdrun.data.loaders import make_loaders
from kdrun.tasks import base as tasks
from kdrun.tasks.classification import Classification
from tests.conftest import QUICK, compose_cfg, run
from tests.engine._parts import CPU, NaNAtStep, ProjectedL2, TinyNet, batches, tiny_data, trainer_for

# ---------------------------------------------------------------------------------------------------
# mdistiller's DOT, verbatim: megvii-research/mdistiller@a08d46f mdistiller/engine/dot.py L9-174 (its unused
# imports, math and torch.optim._functional, its docstring and three unused locals left out).


def check_in(t, l):  # noqa: ANN001, ANN201, E741
    for i in l:
        if t is i:
            return True
    return False


def dot(params: List[Tensor],
        d_p_list: List[Tensor],
        momentum_buffer_list: List[Optional[Tensor]],
        kd_grad_buffer: List[Optional[Tensor]],
        kd_momentum_buffer: List[Optional[Tensor]],
        kd_params: List[Tensor],
        *,
        weight_decay: float,
        momentum: float,
        momentum_kd: float,
        lr: float,
        dampening: float):  # noqa: ANN201
    for i, param in enumerate(params):
        d_p = d_p_list[i]
        if weight_decay != 0:
            d_p = d_p.add(param, alpha=weight_decay)
        if momentum != 0:
            buf = momentum_buffer_list[i]
            if buf is None:
                buf = torch.clone(d_p).detach()
                momentum_buffer_list[i] = buf
            elif check_in(param, kd_params):
                buf.mul_(momentum).add_(d_p, alpha=1 - dampening)
            else:
                buf.mul_((momentum_kd + momentum) / 2.).add_(d_p, alpha=1 - dampening)
            d_p = buf
        # update params with task-loss grad
        param.add_(d_p, alpha=-lr)

    for i, (d_p, buf, p) in enumerate(zip(kd_grad_buffer, kd_momentum_buffer, kd_params)):
        # update params with kd-loss grad
        if buf is None:
            buf = torch.clone(d_p).detach()
            kd_momentum_buffer[i] = buf
        elif check_in(p, params):
            buf.mul_(momentum_kd).add_(d_p, alpha=1 - dampening)
        else:
            if weight_decay != 0:
                d_p = d_p.add(p, alpha=weight_decay)
            buf.mul_((momentum_kd + momentum) / 2.).add_(d_p, alpha=1 - dampening)
        p.add_(buf, alpha=-lr)


class DistillationOrientedTrainer(Optimizer):
    def __init__(
        self,
        params,
        lr=required,
        momentum=0,
        momentum_kd=0,
        dampening=0,
        weight_decay=0):  # noqa: ANN001
        if lr is not required and lr < 0.0:
            raise ValueError("Invalid learning rate: {}".format(lr))
        if momentum < 0.0:
            raise ValueError("Invalid momentum value: {}".format(momentum))
        if momentum_kd < 0.0:
            raise ValueError("Invalid momentum kd value: {}".format(momentum_kd))
        if weight_decay < 0.0:
            raise ValueError("Invalid weight_decay value: {}".format(weight_decay))
        defaults = dict(lr=lr, momentum=momentum, momentum_kd=momentum_kd, dampening=dampening,
                        weight_decay=weight_decay)
        self.kd_grad_buffer = []
        self.kd_grad_params = []
        self.kd_momentum_buffer = []
        super(DistillationOrientedTrainer, self).__init__(params, defaults)

    @torch.no_grad()
    def step_kd(self, closure=None):  # noqa: ANN001, ANN201
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        assert len(self.param_groups) == 1, "Only implement for one-group params."
        for group in self.param_groups:
            params_with_grad = []
            d_p_list = []
            momentum_kd_buffer_list = []
            # (L108-110 read weight_decay, dampening and lr into locals it never uses: left out, for pyflakes)
            for p in group['params']:
                if p.grad is not None:
                    params_with_grad.append(p)
                    d_p_list.append(p.grad)
                    state = self.state[p]
                    if 'momentum_kd_buffer' not in state:
                        momentum_kd_buffer_list.append(None)
                    else:
                        momentum_kd_buffer_list.append(state['momentum_kd_buffer'])

        self.kd_momentum_buffer = momentum_kd_buffer_list
        self.kd_grad_buffer = d_p_list
        self.kd_grad_params = params_with_grad
        return loss

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        assert len(self.param_groups) == 1, "Only implement for one-group params."
        for group in self.param_groups:
            params_with_grad = []
            d_p_list = []
            momentum_buffer_list = []
            weight_decay = group['weight_decay']
            momentum = group['momentum']
            momentum_kd = group['momentum_kd']
            dampening = group['dampening']
            lr = group['lr']

            for p in group['params']:
                if p.grad is not None:
                    params_with_grad.append(p)
                    d_p_list.append(p.grad)

                    state = self.state[p]
                    if 'momentum_buffer' not in state:
                        momentum_buffer_list.append(None)
                    else:
                        momentum_buffer_list.append(state['momentum_buffer'])
            dot(params_with_grad,
                d_p_list,
                momentum_buffer_list,
                self.kd_grad_buffer,
                self.kd_momentum_buffer,
                self.kd_grad_params,
                weight_decay=weight_decay,
                momentum=momentum,
                momentum_kd=momentum_kd,
                lr=lr,
                dampening=dampening)
            # update momentum_buffers in state
            for p, momentum_buffer in zip(params_with_grad, momentum_buffer_list):
                state = self.state[p]
                state['momentum_buffer'] = momentum_buffer
            for p, momentum_kd_buffer in zip(self.kd_grad_params, self.kd_momentum_buffer):
                state = self.state[p]
                state['momentum_kd_buffer'] = momentum_kd_buffer
            self.kd_grad_buffer = []
            self.kd_grad_params = []
            self.kd_momentum_buffer = []
        return loss


# ---------------------------------------------------------------------------------------------------
# The two sides on the same tiny run.

# β, Δ as mdistiller's CIFAR configs; a weight decay 100× theirs so that a decay in the wrong buffer shows.
BETA, DELTA, WD, ALPHA_TASK, ALPHA_DISTILL, LR = 0.9, 0.075, 0.05, 0.1, 0.9, 0.5
# The parameter cases: with KL every student parameter is shared and the projector distillation-only; with
# the feature term alone the classifier is task-only too.
DISTILL = {"kl_feat": lambda: {"kl": KL(temperature=4.0), "feat": ProjectedL2()},
           "feat": lambda: {"feat": ProjectedL2()}}


def make_dot_step(distill: dict[str, DistillLoss], balancer: DOT | None = None) -> KDStep:
    """tests/engine/_parts.py ``make_step`` with these distill terms, DOT and the plain SGD it needs (lr LR,
    a 1/(1+s) schedule: DOT's buffers hold no lr, as mdistiller's)."""
    settings = StepSettings()
    t, cfg = trainer_for(settings)
    task = Classification()
    teacher = Teacher(Tapped(TinyNet(6, seed=1), ["pre_logits"]), CPU, "fp32")
    student = Tapped(TinyNet(5, seed=2), ["pre_logits"])
    data = tiny_data()
    groups = task.objective_groups(distill)
    balancer = balancer or DOT(momentum=BETA, delta=DELTA, weight_decay=WD, alpha_task=ALPHA_TASK,
                               alpha_distill=ALPHA_DISTILL)
    balancer.bind(tuple(groups))
    loaders = make_loaders(data, t, 0, CPU, aux=False, task=task)
    trainable = build_trainable(distill, {}, data, task, student, teacher, len(loaders.train), CPU)
    opt = torch.optim.SGD(trainable.parameters(), lr=LR, momentum=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    parts = Parts(trainer=t, device=CPU, seed=0, data=data, task=task, teacher=teacher, student=student,
                  trainable=trainable, model=trainable, groups=groups, balancer=balancer, loaders=loaders,
                  optimizer=opt, scheduler=sched, scaler=torch.amp.GradScaler("cpu", enabled=False),
                  steps_per_epoch=len(loaders.train), total_steps=len(loaders.train) * t.epochs)
    return engine_make_step(parts, cfg, TrainState())  # type: ignore[arg-type]


def mdistiller_step(twin: KDStep, opt: DistillationOrientedTrainer, batch: Any, i: int, lr: float) -> None:
    """mdistiller/engine/trainer.py L269-279 (DOT.train_iter) on the twin's forward, at the lr of step i."""
    x, y, idx = twin.to_device(batch)
    twin.trainable.set_progress(i)
    _, terms = twin.model(x, y, twin.teacher_outputs(batch, x), index=idx)
    objectives = tasks.group(terms, twin.groups)
    # the KD distiller's weighted losses (mdistiller/distillers/KD.py: loss_ce = CE_WEIGHT·CE, loss_kd = KD_WEIGHT·KD)
    loss_ce, loss_kd = ALPHA_TASK * objectives["task"], ALPHA_DISTILL * objectives["distill"]
    opt.param_groups[0]["lr"] = lr  # mdistiller sets the group's lr (utils.py adjust_learning_rate)
    opt.zero_grad(set_to_none=True)
    loss_kd.backward(retain_graph=True)
    opt.step_kd()
    opt.zero_grad(set_to_none=True)
    loss_ce.backward()
    opt.step()


def reference(twin: KDStep) -> DistillationOrientedTrainer:
    # trainer.py L232-240: momentum = β − Δ, momentum_kd = β + Δ, one group of every learnable parameter
    return DistillationOrientedTrainer(twin.params, lr=LR, momentum=BETA - DELTA, momentum_kd=BETA + DELTA,
                                       weight_decay=WD)


def worst(a: KDStep, b: KDStep) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.params, b.params))


@pytest.mark.parametrize("case", sorted(DISTILL))
def test_five_steps_equal_mdistillers_dot(case: str) -> None:
    step, twin = make_dot_step(DISTILL[case]()), make_dot_step(DISTILL[case]())
    assert worst(step, twin) == 0.0  # same seeds: the same start
    opt = reference(twin)
    names = [n for n, p in step.trainable.named_parameters() if p.requires_grad]
    diffs = []
    for i, batch in enumerate(batches(5, seed=3)):
        lr = step.optimizer.param_groups[0]["lr"]
        assert step(batch, i).finite
        mdistiller_step(twin, opt, batch, i, lr)
        diffs.append(worst(step, twin))
        # Every buffer where mdistiller has it, and none where it has none (which parameter gets which).
        for j, (name, p) in enumerate(zip(names, twin.params)):
            for side, key in (("task", "momentum_buffer"), ("distill", "momentum_kd_buffer")):
                ours = step.balancer._buffers.get(f"{side}_momentum_{j}")
                theirs = opt.state[p].get(key)
                assert (ours is None) == (theirs is None), (i, name, side)
                if theirs is not None:
                    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, msg=f"step {i} {name} {side}")
    assert max(diffs) < 1e-6, diffs  # measured 1.2e-7: the last bits of −lr·(b_t + b_d) in one add vs two
    moved = max((p - q).abs().max().item() for p, q in zip(step.params, make_dot_step(DISTILL[case]()).params))
    assert moved > 1e-2  # the comparison is not vacuous
    # The parameter cases the parametrisation promises (both sides, task-only, distillation-only).
    for j, name in enumerate(names):
        sides = {s for s in ("task", "distill") if f"{s}_momentum_{j}" in step.balancer._buffers}
        want = {"distill"} if ".proj." in name else {"task"} if case == "feat" and ".fc." in name else {"task", "distill"}
        assert sides == want, (name, sides)


def test_mdistillers_momenta_are_beta_minus_and_plus_delta() -> None:
    """The convention of trainer.py L232-233 and the single-objective momentum of dot.py L39/L54."""
    d = DOT(momentum=0.9, delta=0.075)
    assert (d.momentum_task, d.momentum_distill) == (0.9 - 0.075, 0.9 + 0.075)
    assert d.momentum_single == pytest.approx(0.9, abs=1e-15)


# ---------------------------------------------------------------------------------------------------
# The engine's guarantees for DOT's state.


def state_of(step: KDStep) -> dict[str, Tensor]:
    out = {f"param/{k}": v.detach().clone() for k, v in step.trainable.state_dict().items()}
    out.update({f"balancer/{k}": v.clone() for k, v in step.balancer.state_dict().items()})
    return out


def test_state_dict_round_trip_mid_way_continues_identically() -> None:
    data = batches(5, seed=3)
    straight = make_dot_step(DISTILL["feat"]())
    for i, b in enumerate(data):
        straight(b, i)
    first = make_dot_step(DISTILL["feat"]())
    for i, b in enumerate(data[:2]):
        first(b, i)
    buf = io.BytesIO()  # as the checkpoint stores it (kdrun/runtime/checkpoint.py STATEFUL), loaded on the CPU
    torch.save({k: getattr(first, k).state_dict() for k in ("trainable", "optimizer", "scheduler", "balancer")}, buf)
    buf.seek(0)
    saved = torch.load(buf, map_location="cpu", weights_only=True)
    assert any(k.startswith("distill_momentum_") for k in saved["balancer"])
    resumed = make_dot_step(DISTILL["feat"]())  # a fresh balancer: no buffers until it loads them
    assert not resumed.balancer.state_dict()
    for k in ("trainable", "optimizer", "scheduler", "balancer"):
        getattr(resumed, k).load_state_dict(saved[k])
    for i, b in enumerate(data[2:], start=2):
        resumed(b, i)
    a, b = state_of(straight), state_of(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_nonfinite_step_leaves_the_buffers_unchanged() -> None:
    distill = {**DISTILL["kl_feat"](), "nan": NaNAtStep(at=[3])}
    step = make_dot_step(distill)
    data = batches(5, seed=3)
    for i in range(3):
        assert step(data[i], i).finite
    before = {k: v.clone() for k, v in step.balancer.state_dict().items()}
    params = [p.detach().clone() for p in step.params]
    assert not step(data[3], 3).finite  # the NaN term fires: the staged buffers are NaN
    after = step.balancer.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(p, q) for p, q in zip(params, step.params))
    assert step(data[4], 4).finite  # the next step starts from the buffers of step 2
    assert all(torch.isfinite(v).all() for v in step.balancer.state_dict().values())


def test_fp16_loss_scale_is_divided_out_of_the_buffers() -> None:
    """The Jacobian carries the GradScaler's scale; the buffers must not (the engine unscales .grad only)."""
    plain, scaled = make_dot_step(DISTILL["kl_feat"]()), make_dot_step(DISTILL["kl_feat"]())
    scaled.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaled.scaler.scale(torch.zeros(()))  # GradScaler makes its scale tensor at the first scale() call
    for i, b in enumerate(batches(3, seed=3)):
        plain(b, i)
        scaled(b, i)
    a, b = plain.balancer.state_dict(), scaled.balancer.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------------
# Config: the optimiser must leave DOT the momentum.


@pytest.mark.parametrize("overrides,found,fix", [
    ([], "optimizer.momentum=0.9, optimizer.weight_decay=0.0005", "optimizer.momentum=0 optimizer.weight_decay=0"),
    (["optimizer=adamw"], "optimizer._target_=kdrun.optim.optimizer.adamw", "optimizer=sgd_plain"),
    (["optimizer=sgd_plain", "optimizer.nesterov=true"], "optimizer.nesterov=True", "optimizer.nesterov=false"),
    (["optimizer=sgd_plain", "trainer.grad_clip=1.0"], "trainer.grad_clip=1.0", "trainer.grad_clip=0"),
])
def test_config_refuses_an_optimiser_with_its_own_momentum(overrides: list[str], found: str, fix: str) -> None:
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg(["balancer=dot", *overrides]))
    msg = str(e.value)
    assert "\n" not in msg and f"this run has {found}." in msg and fix in msg, msg


def test_config_refuses_a_negative_task_momentum() -> None:
    with pytest.raises(ConfigError, match="balancer.delta=0.95 exceeds balancer.momentum=0.9"):
        validate(compose_cfg(["balancer=dot", "optimizer=sgd_plain", "balancer.delta=0.95"]))


def test_cli_refusal_is_one_paragraph_exit_2(kdrun_cli: Any, tmp_path: Path) -> None:
    code, _, err = kdrun_cli("train", "balancer=dot", *QUICK, f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2 and "balancer=dot keeps DOT's momentum" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_dot_run_trains_and_resumes_through_the_checkpoint(tmp_path: Path) -> None:
    """The engine end to end: config → build → KDStep → last.pt → trainer.resume=auto, equal to a straight run."""
    from kdrun.runtime import checkpoint as ckpt

    common = ["teacher=convnet_l", "teacher.checkpoint=null", "teacher.allow_random=true", "distill=kl",
              "balancer=dot", "optimizer=sgd_plain", *QUICK, "trainer.epochs=1", "trainer.deterministic=true",
              "dataset.augment=false"]
    run([*common, "trainer.max_steps=4"], tmp_path / "straight")
    run([*common, "trainer.max_steps=2"], tmp_path / "part")
    res = run([*common, "trainer.max_steps=4", "trainer.resume=auto"], tmp_path / "part")
    assert res["steps"] == 4
    a, b = ckpt.load(tmp_path / "straight" / "last.pt"), ckpt.load(tmp_path / "part" / "last.pt")
    assert a["balancer"].keys() == b["balancer"].keys() and any(k.startswith("task_momentum_") for k in a["balancer"])
    for part in ("trainable", "balancer"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), (part, k)
