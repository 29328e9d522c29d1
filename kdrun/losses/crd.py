"""Contrastive Representation Distillation (Tian, Krishnan & Isola, ICLR 2020), as in the authors'
CRD/RepDistiller code (also mdistiller's port).

Student and teacher penultimate features (``pre_logits``) are embedded by linear heads g_s, g_t into
ℝ^d (d = 128) and L2-normalised. A memory bank keeps one embedding per *training sample* for each
network (M_s, M_t ∈ ℝ^{N×d}). For a batch sample with dataset index i and K negative indices n_1..n_K
(K = 16384), scores against the *other* network's memory are

    h_s(j) = exp(⟨M_t[j], g_s(x_i)⟩ / τ) / Z_s,   h_t(j) = exp(⟨M_s[j], g_t(x_i)⟩ / τ) / Z_t,

for j ∈ {i, n_1..n_K} (τ = 0.07), where Z_s, Z_t are fixed from the first training batch as
N × mean(exp(·/τ)). The NCE loss of each side, with noise probability P_n = 1/N and m = K,

    ℓ_side = −(1/B) Σ_i [ log(h(i) / (h(i) + m P_n + ε)) + Σ_k log(m P_n / (h(n_k) + m P_n + ε)) ],

(ε = 1e-7) is summed, ℓ = ℓ_s + ℓ_t. After the loss, in training mode only, the memories of the batch
indices are updated with momentum 0.5 and renormalised:
M_s[i] ← normalise(0.5·M_s[i] + 0.5·g_s(x_i)), M_t[i] likewise. Benchmark term weight: 0.8.

What the engine must pass: ``forward(s, t, target, index=idx)`` with ``idx`` the LongTensor [B] of the
batch samples' positions in the *training set* (the dataset must return them, e.g. ``(x, y, index)``),
0 ≤ idx < ``num_data``. Optionally ``contrast_index`` [B, K+1] with column 0 = idx and the negatives in
the other columns: CRD's CIFAR benchmark draws the negatives from *other classes* in the dataset
("exact" mode, RepDistiller's ``CIFAR100InstanceSample``). Without it the negatives are drawn uniformly
from [0, N) here (RepDistiller's fallback path), so a negative shares the anchor's class with
probability ≈ 1/num_classes. CRD declares ``needs_index = True`` so the engine can tell.

State: the memories and Z are buffers (``memory_s``, ``memory_t``, ``z_s``, ``z_t``) and are saved in
checkpoints; ``num_data`` must be the training-set size (50 000 for CIFAR-100). Under DDP every rank
updates its own copy from its own batch, like the single-GPU reference; buffers are not synchronised.
The memory and Z change only in a training-mode forward with autograd enabled. In evaluation, and in a
no-grad re-evaluation (the engine's recompute of the objectives after the step, for FAMO/MoKD-style
balancers), the bank is left untouched, and a re-evaluation of the same ``index`` reuses the previous
call's negatives so that the two losses differ by the parameters (and the one memory update) only.

Batch structure: the loss depends on the sampled negatives and on the memory (which the batch itself
updates), so it is neither deterministic nor batch-duplication invariant.
"""
from __future__ import annotations

import math
from typing import Annotated, Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdrun.config import Ge, Gt, Le
from kdrun.losses._common import need_setup
from kdrun.losses.base import DistillLoss, tap
from kdrun.models.taps import ModelOutput


def nce_loss(x: Tensor, num_data: int, eps: float = 1e-7) -> Tensor:
    """CRD's ContrastLoss: x [B, K+1] of normalised scores, column 0 the positive."""
    m = x.shape[1] - 1
    noise = m / float(num_data)  # m · P_n
    log_d1 = torch.log(x[:, 0] / (x[:, 0] + noise + eps))
    log_d0 = torch.log(noise / (x[:, 1:] + noise + eps))
    return -(log_d1.sum() + log_d0.sum()) / x.shape[0]


class Embed(nn.Module):
    """Linear head followed by L2 normalisation (CRD's ``Embed``)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x.reshape(x.shape[0], -1)).float(), dim=1)


class CRD(DistillLoss):
    needs_index = True  # the engine must pass the dataset indices (see the module docstring)

    def __init__(self, student_tap: str = "pre_logits", teacher_tap: str = "pre_logits",
                 feat_dim: Annotated[int, Ge(1)] = 128, num_negatives: Annotated[int, Ge(1)] = 16384,
                 temperature: Annotated[float, Gt(0.0)] = 0.07,
                 momentum: Annotated[float, Ge(0.0), Le(1.0)] = 0.5,
                 num_data: Optional[Annotated[int, Ge(1)]] = None) -> None:
        super().__init__()
        self.student_tap = str(student_tap)
        self.teacher_tap = str(teacher_tap)
        self.student_taps = (self.student_tap,)
        self.teacher_taps = (self.teacher_tap,)
        self.feat_dim = int(feat_dim)
        self.num_negatives = int(num_negatives)
        self.temperature = float(temperature)
        self.momentum = float(momentum)
        # None: the training-set size, which the engine sets (``num_data``) before ``setup``.
        self.num_data = None if num_data is None else int(num_data)
        self.embed_s: Embed | None = None
        self.embed_t: Embed | None = None
        self.register_buffer("memory_s", torch.empty(0, self.feat_dim))
        self.register_buffer("memory_t", torch.empty(0, self.feat_dim))
        if self.num_data is not None:
            self._alloc_memory()
        self.register_buffer("z_s", torch.tensor(-1.0))  # < 0: not set yet
        self.register_buffer("z_t", torch.tensor(-1.0))
        self._last_negatives: tuple[Tensor, Tensor] | None = None  # (index, sampled idx) of the last call

    def _alloc_memory(self) -> None:
        # The reference initialises the memories uniformly in [-σ, σ], σ = 1/sqrt(d/3) (unit norm on average).
        std = 1.0 / math.sqrt(self.feat_dim / 3)
        assert self.num_data is not None
        self.memory_s = torch.rand(self.num_data, self.feat_dim).mul_(2 * std).add_(-std)
        self.memory_t = torch.rand(self.num_data, self.feat_dim).mul_(2 * std).add_(-std)

    def setup(self, student: dict[str, Any], teacher: dict[str, Any]) -> None:
        if self.num_data is None:
            raise ValueError("distill.crd.num_data is not set and the engine did not provide the "
                             "training-set size.")
        if self.memory_s.shape[0] != self.num_data:
            self._alloc_memory()
        self.embed_s = Embed(math.prod(student[self.student_tap]), self.feat_dim)
        self.embed_t = Embed(math.prod(teacher[self.teacher_tap]), self.feat_dim)

    def _updating(self) -> bool:
        """State (memory, Z) changes only in a training forward with autograd on: not in evaluation and
        not in a no-grad re-evaluation of the same batch (the engine's L(θ_{t+1}) for FAMO/MoKD-style
        balancers)."""
        return self.training and torch.is_grad_enabled()

    def _normaliser(self, name: str, out: Tensor) -> Tensor:
        z = getattr(self, name)
        if z.item() > 0:
            return z
        value = out.detach().mean() * self.num_data
        if self._updating():  # fixed once, from the first training batch
            z.fill_(value.item())
        return value

    def forward(self, s: ModelOutput, t: ModelOutput, target: Tensor, index: Tensor | None = None,
                contrast_index: Tensor | None = None) -> Tensor:
        need_setup(self, self.embed_s)
        assert self.embed_s is not None and self.embed_t is not None
        if index is None:
            raise ValueError("CRD needs the training-set index of every batch sample: call "
                             "forward(s, t, target, index=idx) with idx a LongTensor [B] (the dataset must "
                             "return (x, y, index)).")
        fs = self.embed_s(tap(s, self.student_tap))
        ft = self.embed_t(tap(t, self.teacher_tap).detach())
        b, k = fs.shape[0], self.num_negatives
        index = index.to(self.memory_s.device).long().reshape(-1)
        if contrast_index is None:
            last = self._last_negatives
            if not self._updating() and last is not None and torch.equal(last[0], index):
                idx = last[1]  # a re-evaluation of the same batch: same negatives, comparable loss
            else:
                idx = torch.randint(0, self.num_data, (b, k + 1), device=self.memory_s.device)
                idx[:, 0] = index
                self._last_negatives = (index, idx)
        else:
            idx = contrast_index.to(self.memory_s.device).long()
            if idx.shape != (b, k + 1):
                raise ValueError(f"contrast_index must have shape (B, num_negatives + 1) = {(b, k + 1)}, "
                                 f"got {tuple(idx.shape)}")
        w_t = self.memory_t[idx]  # [B, K+1, d], buffers carry no gradient
        w_s = self.memory_s[idx]
        out_s = torch.exp(torch.bmm(w_t, fs.unsqueeze(2)).squeeze(2) / self.temperature)
        out_t = torch.exp(torch.bmm(w_s, ft.unsqueeze(2)).squeeze(2) / self.temperature)
        out_s = out_s / self._normaliser("z_s", out_s)
        out_t = out_t / self._normaliser("z_t", out_t)
        loss = nce_loss(out_s, self.num_data) + nce_loss(out_t, self.num_data)
        if self._updating():
            with torch.no_grad():
                for memory, f in ((self.memory_s, fs), (self.memory_t, ft)):
                    pos = memory[index] * self.momentum + f.detach() * (1 - self.momentum)
                    memory.index_copy_(0, index, F.normalize(pos, dim=1))
        return loss
