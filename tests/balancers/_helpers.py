"""A tiny two-objective student, and its StepContext built by the engine's own builder
(:func:`kdrun.engine.context.step_context`), so balancers are tested against the context a run gives them."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdrun.balancers.base import Balancer, StepContext, StepResult
from kdrun.engine.context import step_context

NAMES = ("distill", "task")


class TinyStudent(nn.Module):
    """Shared trunk + a task head (CE) + a distillation head (KL to fixed teacher logits).

    The heads are private parameters (each touched by one objective), the trunk is shared, and
    ``unused`` receives no gradient at all, so every path of ``Jacobian.write_grad`` is exercised.
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.trunk = nn.Linear(4, 3)
        self.head_task = nn.Linear(3, 5)
        self.head_distill = nn.Linear(3, 5)
        self.unused = nn.Linear(2, 2)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.7)

    def objectives(self, batch: tuple[Tensor, Tensor, Tensor],
                   names: tuple[str, ...] = NAMES) -> dict[str, Tensor]:
        x, y, t = batch
        h = torch.tanh(self.trunk(x))
        out = {
            "task": F.cross_entropy(self.head_task(h), y),
            "distill": F.kl_div(F.log_softmax(self.head_distill(h), -1), F.softmax(t, -1),
                                reduction="batchmean"),
        }
        return {n: out[n] for n in names}


def make_batch(seed: int, n: int = 8) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, 5, (n,), generator=g), \
        torch.randn(n, 5, generator=g) * 2


def make_ctx(model: TinyStudent, step: int, batch: tuple[Tensor, Tensor, Tensor],
             names: tuple[str, ...] = NAMES,
             aux_batch: tuple[Tensor, Tensor, Tensor] | None = None,
             all_reduce_mean: Callable[[Tensor], Tensor] = lambda t: t) -> StepContext:
    params = [p for p in model.parameters() if p.requires_grad]
    objectives = model.objectives(batch, names)

    def recompute() -> dict[str, Tensor]:
        with torch.no_grad():
            return {k: v.detach() for k, v in model.objectives(batch, names).items()}

    def aux() -> dict[str, Tensor]:
        assert aux_batch is not None
        return {"task": model.objectives(aux_batch, names)["task"]}  # like the engine: no teacher

    return step_context(step, objectives, params, aux_objectives=aux if aux_batch is not None else None,
                        recompute_objectives=recompute, all_reduce_mean=all_reduce_mean)


def train_step(balancer: Balancer, model: TinyStudent, opt: torch.optim.Optimizer, step: int,
               names: tuple[str, ...] = NAMES) -> tuple[StepResult, StepContext]:
    """One engine step: zero grads, step(), optimiser step, after_step()."""
    opt.zero_grad(set_to_none=True)
    ctx = make_ctx(model, step, make_batch(step), names, aux_batch=make_batch(10_000 + step))
    res = balancer.step(ctx)
    opt.step()
    balancer.after_step(ctx)
    return res, ctx


def state_copy(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def states_equal(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)
