"""Per-objective gradients, their rank average, the Gram matrix, and the diagnostics logged from it.

Notation (DTO-KD §3, Eq. 4 and 8): for objectives L₁…L_k and the *shared* student parameters θ, the
Jacobian is J = [∇L₁; …; ∇L_k] ∈ ℝ^{k×n} and the Gram matrix G = J Jᵀ (gᵢⱼ = ⟨∇Lᵢ, ∇Lⱼ⟩). The
gradients of the log-losses are ∇log Lᵢ = ∇Lᵢ / Lᵢ, i.e. J_log = diag(1/L) J and G_log = D G D with
D = diag(1/L); no second backward is needed for them.

Shared vs private parameters: a parameter that receives gradient from every objective is *shared* and
enters J; a parameter touched by only some objectives (a projector, a distillation head) is *private*:
its gradient is kept per objective and scaled by that objective's weight when the update is written
(:meth:`Jacobian.write_grad`). Parameters no objective touches get no gradient.

DDP: ``torch.autograd.grad`` bypasses DDP's reducer, so :func:`compute_jacobian` averages J (and the
private gradients) across ranks itself, before anything is computed from them; every rank therefore
sees the same G, computes the same weights and writes the same update.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor


@dataclass
class Jacobian:
    """Per-objective gradients. ``matrix`` is (k, n) over the shared parameters, fp32.

    ``private[i][j]`` is objective i's gradient of private parameter j (``None`` where untouched).
    ``scale`` is the loss scale the gradients carry (fp16 GradScaler); weight rules are invariant to
    it (they are homogeneous of degree 0 in J), diagnostics divide it out.
    """

    names: tuple[str, ...]
    matrix: Tensor
    shared: list[Tensor]
    private_params: list[Tensor]
    private: list[list[Tensor | None]]
    scale: float = 1.0

    def gram(self) -> Tensor:
        """G = J Jᵀ (k × k), in fp64 for the closed-form weight rules."""
        m = self.matrix.double()
        return m @ m.T

    def combine(self, weights: Tensor) -> Tensor:
        """The shared-parameter update Σᵢ wᵢ ∇Lᵢ as a flat (n,) vector."""
        return weights.to(self.matrix.dtype) @ self.matrix

    def write_grad(self, weights: Tensor, direction: Tensor | None = None) -> None:
        """Write the update into ``.grad``: shared params get ``direction`` (default Σ wᵢ∇Lᵢ),
        private params get Σᵢ wᵢ ∇ᵢ over the objectives that touch them."""
        flat = self.combine(weights) if direction is None else direction
        offset = 0
        for p in self.shared:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).to(p.dtype).clone()
            offset += n
        w = weights.to(torch.float32)
        for j, p in enumerate(self.private_params):
            acc = None
            for i in range(len(self.names)):
                g = self.private[i][j]
                if g is not None:
                    acc = w[i] * g if acc is None else acc + w[i] * g
            p.grad = None if acc is None else acc.to(p.dtype)


def reachable_params(loss: Tensor) -> set[int]:
    """``id`` of every leaf tensor the autograd graph of ``loss`` reaches (its AccumulateGrad nodes).

    A walk over the graph's nodes (≈ 0.3 ms for DeiT-Ti on a CPU): it decides shared vs private
    structurally in the batched path, where the vmapped backward returns zeros (not ``None``) for
    parameters an objective does not reach.
    """
    found: set[int] = set()
    seen: set[object] = set()
    stack = [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)
        if var is not None:
            found.add(id(var))
        stack.extend(f for f, _ in fn.next_functions)
    return found


class JacobianMode:
    """How :func:`compute_jacobian` gets the k gradients (``trainer.jacobian``).

    * ``"loop"``: k calls of ``torch.autograd.grad``, every one but the last retaining the graph.
    * ``"batched"``: one ``torch.autograd.grad(stack(L), θ, grad_outputs=I_k, is_grads_batched=True)``
      — the k backward passes vmapped into one (larger kernels, fewer launches; k× the backward's
      gradient memory). Fails with a clear error if an op has no batching rule.
    * ``"auto"``: batched, and if the first attempt raises or warns that vmap fell back to a slow
      per-sample loop, the loop from then on (the attempt retains the graph, so the same step is
      redone by the loop). The decision is kept for the rest of the run.
    """

    def __init__(self, mode: str = "loop") -> None:
        if mode not in ("loop", "batched", "auto"):
            raise ValueError(f"trainer.jacobian={mode!r} is not one of loop, batched, auto")
        self.mode = mode

    @property
    def batched(self) -> bool:
        """Whether the next call tries the vmapped backward (``auto`` until it decides, or ``batched``)."""
        return self.mode != "loop"

    def grads(self, losses: list[Tensor], params: list[Tensor], retain_graph: bool) -> list[tuple[Tensor | None, ...]]:
        """Per-objective gradients; ``None`` where an objective does not reach a parameter."""
        if self.batched and len(losses) > 1:
            if self.mode == "batched":
                return _batched_grads(losses, params, retain_graph)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    out = _batched_grads(losses, params, retain_graph=True)
                except RuntimeError as e:
                    out, reason = None, f"{type(e).__name__}: {str(e).splitlines()[0]}"
            slow = [w for w in caught if "performance drop" in str(w.message)]
            if out is not None and not slow:
                self.mode = "batched"  # decided: later steps need not retain the graph for a retry
                return out
            reason = reason if out is None else str(slow[0].message).splitlines()[0]
            warnings.warn(f"trainer.jacobian=auto: the batched per-objective backward is not usable for "
                          f"this model ({reason}); using one backward per objective.", stacklevel=2)
            self.mode = "loop"
        out_loop: list[tuple[Tensor | None, ...]] = []
        for i, loss in enumerate(losses):
            keep = retain_graph or i < len(losses) - 1
            out_loop.append(torch.autograd.grad(loss, params, retain_graph=keep, allow_unused=True))
        return out_loop


def _batched_grads(losses: list[Tensor], params: list[Tensor], retain_graph: bool) -> list[tuple[Tensor | None, ...]]:
    reach = [reachable_params(loss) for loss in losses]
    stacked = torch.stack([loss.float() for loss in losses])
    eye = torch.eye(len(losses), dtype=stacked.dtype, device=stacked.device)
    grads = torch.autograd.grad(stacked, params, grad_outputs=eye, retain_graph=retain_graph,
                                allow_unused=True, is_grads_batched=True)
    return [tuple(None if g is None or id(p) not in reach[i] else g[i] for p, g in zip(params, grads))
            for i in range(len(losses))]


def compute_jacobian(
    objectives: dict[str, Tensor],
    params: Sequence[Tensor],
    *,
    retain_graph: bool = False,
    scale: float = 1.0,
    all_reduce_mean: Callable[[Tensor], Tensor] = lambda t: t,
    mode: JacobianMode | None = None,
) -> Jacobian:
    """Per-objective gradients of ``objectives`` w.r.t. ``params`` (see :class:`JacobianMode`).

    The graph is freed afterwards unless ``retain_graph``. A parameter is shared when every objective
    reaches it. Gradients are averaged across ranks with ``all_reduce_mean`` before the shared/private
    split is used, so all ranks agree.
    """
    names = tuple(objectives)
    params = [p for p in params if p.requires_grad]
    losses = [objectives[n] * scale if scale != 1.0 else objectives[n] for n in names]
    per_obj = (mode or JacobianMode("loop")).grads(losses, params, retain_graph)
    shared_idx = [j for j in range(len(params)) if all(g[j] is not None for g in per_obj)]
    private_idx = [j for j in range(len(params)) if j not in set(shared_idx)
                   and any(g[j] is not None for g in per_obj)]
    if shared_idx:
        matrix = torch.stack([
            torch.cat([g[j].reshape(-1).float() for j in shared_idx]) for g in per_obj
        ])
    else:
        matrix = torch.zeros(len(names), 0, device=objectives[names[0]].device)
    matrix = all_reduce_mean(matrix)
    private = [[None if g[j] is None else all_reduce_mean(g[j].float()) for j in private_idx]
               for g in per_obj]
    return Jacobian(names, matrix, [params[j] for j in shared_idx], [params[j] for j in private_idx],
                    private, scale)


class FeatureJacobian(Jacobian):
    """Per-objective gradients w.r.t. a shared *representation* z instead of the parameters
    (``trainer.grad_space=features``; MGDA-UB, Sener & Koltun 2018, §3.3).

    ``matrix`` is (k, B·d): ∂Lᵢ/∂z for this rank's batch. Because the samples differ across ranks, the
    global Gram matrix is not the Gram of an averaged matrix but the sum of the ranks' Grams:
    L = (1/W) Σ_r L_r gives ∂L/∂z_r = (1/W) ∂L_r/∂z_r, hence G = (1/W²) Σ_r G_r — one k×k all-reduce.
    The update is then one ordinary backward of Σ wᵢ Lᵢ (through DDP's reducer), so a step costs one
    backward to z per objective (cheap: z is the last shared layer) plus one full backward. Weight
    rules that need only G (DTO exact, the torchjd Gramian methods) work unchanged; methods that need
    parameter gradients (cross-batch, GradNorm) refuse this space.
    """

    def __init__(self, names: tuple[str, ...], matrix: Tensor, gram_global: Tensor,
                 objectives: dict[str, Tensor], backward: Callable[[Tensor], None], scale: float = 1.0) -> None:
        super().__init__(names, matrix, [], [], [[] for _ in names], scale)
        self._gram = gram_global
        self._objectives = objectives
        self._backward = backward

    def gram(self) -> Tensor:
        return self._gram

    def combine(self, weights: Tensor) -> Tensor:
        raise RuntimeError("a feature-space Jacobian has no parameter-space direction; use write_grad(weights)")

    def write_grad(self, weights: Tensor, direction: Tensor | None = None) -> None:
        if direction is not None:
            raise RuntimeError("trainer.grad_space=features supports weighted sums only (no explicit direction)")
        w = weights.detach().to(self.matrix.device, torch.float32)
        self._backward(sum(w[i] * self._objectives[n] for i, n in enumerate(self.names)))


def compute_feature_jacobian(
    objectives: dict[str, Tensor],
    z: Tensor,
    backward: Callable[[Tensor], None],
    *,
    scale: float = 1.0,
    all_reduce_sum: Callable[[Tensor], Tensor] = lambda t: t,
    world_size: int = 1,
) -> FeatureJacobian:
    """∂Lᵢ/∂z for every objective (graph retained for the final backward) and the global Gram."""
    names = tuple(objectives)
    rows = []
    for n in names:
        loss = objectives[n] * scale if scale != 1.0 else objectives[n]
        (g,) = torch.autograd.grad(loss, z, retain_graph=True, allow_unused=True)
        rows.append(torch.zeros_like(z).reshape(-1).float() if g is None else g.reshape(-1).float())
    matrix = torch.stack(rows)
    m = matrix.double()
    gram = all_reduce_sum(m @ m.T) / float(world_size * world_size)
    return FeatureJacobian(names, matrix, gram, objectives, backward, scale)


def log_space(gram: Tensor, losses: Tensor, eps: float) -> Tensor:
    """G of the log-losses from G of the raw losses: D G D with D = diag(1 / max(L, eps))."""
    d = 1.0 / losses.detach().double().clamp_min(eps)
    return gram * d[:, None] * d[None, :]


def diagnostics(
    gram: Tensor,
    names: Sequence[str],
    raw_weights: Tensor | None,
    scale: float = 1.0,
    pair: tuple[str, str] = ("distill", "task"),
) -> dict[str, Tensor]:
    """Gradient statistics from G (raw-loss gradients), as tensors named by their TensorBoard tag.

    * ``grad/norm/<obj>`` = ‖∇Lᵢ‖;
    * for the (distill, task) pair when both exist: ``grad/conflict`` = ⟨g_distill, g_task⟩ (negative
      means conflict, DTO-KD's GrC), ``grad/cosine``, ``grad/dominance`` = ‖g_distill‖/‖g_task‖
      (DTO-KD's GrD) and ``grad/log10_dominance``;
    * for k ≥ 3, ``grad/cosine/<a>__<b>`` for every pair;
    * ``grad/combined_norm`` = ‖Σ wᵢ ∇Lᵢ‖ = sqrt(wᵀ G w) for the raw weights of the step.
    """
    g = gram.double() / (scale * scale)
    norms = g.diagonal().clamp_min(0).sqrt()
    out: dict[str, Tensor] = {f"grad/norm/{n}": norms[i] for i, n in enumerate(names)}
    tiny = torch.finfo(torch.float64).tiny
    if pair[0] in names and pair[1] in names:
        a, b = names.index(pair[0]), names.index(pair[1])
        out["grad/conflict"] = g[a, b]
        out["grad/cosine"] = g[a, b] / (norms[a] * norms[b]).clamp_min(tiny)
        dom = norms[a] / norms[b].clamp_min(tiny)
        out["grad/dominance"] = dom
        out["grad/log10_dominance"] = torch.log10(dom.clamp_min(tiny))
    if len(names) >= 3:
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                out[f"grad/cosine/{names[i]}__{names[j]}"] = g[i, j] / (norms[i] * norms[j]).clamp_min(tiny)
    if raw_weights is not None:
        w = raw_weights.detach().double().to(g.device)
        out["grad/combined_norm"] = (w @ g @ w).clamp_min(0).sqrt()
    return out
