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
0 ≤ idx < ``num_data``; CRD declares ``needs_index = True`` so the engine can tell. :meth:`bind` gives
the training-set size (``info.num_data``: one memory row per sample) and the training labels.

Negatives (``negatives``):

* ``other_class`` (default): as the CIFAR-100 benchmark draws them, RepDistiller's
  ``CIFAR100InstanceSample`` in ``mode='exact'`` (``dataset/cifar100.py`` lines 116-168): the positive
  is the anchor itself and the K negatives are drawn from the samples of *other classes*, without
  replacement (``np.random.choice(cls_negative[target], k, replace=k > len(cls_negative[target]))``,
  line 166-167: with replacement only when fewer than K such samples exist). The anchor's class is
  ``info.labels[index]`` (the data set's own label, so mixup's soft targets do not matter). Needs
  ``info.labels``; without them :meth:`setup` raises.
* ``uniform``: K indices uniform on [0, N) with replacement (RepDistiller's ``crd/memory.py``
  ``AliasMethod`` draw when no ``contrast_idx`` is given), so a negative shares the anchor's class with
  probability ≈ 1/num_classes and may be the anchor itself (``crd/memory.py`` lines 35-37).

``forward(..., contrast_index=)`` [B, K+1] (column 0 = idx) overrides both.

State: the memories and Z are buffers (``memory_s``, ``memory_t``, ``z_s``, ``z_t``) and are saved in
checkpoints; ``num_data`` is the training-set size (50 000 for CIFAR-100), from :meth:`bind`. Under DDP every rank
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
from typing import Annotated, Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdrun.config import Ge, Gt, Le
from kdrun.losses._common import need_setup
from kdrun.losses.base import DataInfo, DistillLoss, tap
from kdrun.models.taps import ModelOutput


def nce_loss(x: Tensor, num_data: int, eps: float = 1e-7) -> Tensor:
    """CRD's ContrastLoss: x [B, K+1] of normalised scores, column 0 the positive."""
    m = x.shape[1] - 1
    noise = m / float(num_data)  # m · P_n
    log_d1 = torch.log(x[:, 0] / (x[:, 0] + noise + eps))
    log_d0 = torch.log(noise / (x[:, 1:] + noise + eps))
    return -(log_d1.sum() + log_d0.sum()) / x.shape[0]


def other_class_negatives(index: Tensor, labels: Tensor, k: int) -> Tensor:
    """[B, k+1] contrast indices: column 0 the anchor ``index``, then k indices of samples whose label
    differs from the anchor's, uniformly without replacement (with replacement for an anchor whose
    class leaves fewer than k others), as RepDistiller's ``CIFAR100InstanceSample`` (mode 'exact')."""
    allowed = labels.unsqueeze(0) != labels[index].unsqueeze(1)  # [B, N]
    n_allowed = allowed.sum(dim=1)
    if bool((n_allowed == 0).any()):
        raise ValueError("CRD other_class negatives: an anchor's class holds every training sample, so there "
                         "are no other-class samples to contrast with; use negatives: uniform.")
    weights = allowed.float()
    neg = torch.empty(index.shape[0], k, dtype=torch.long, device=index.device)
    replace = n_allowed < k
    for rows, with_replacement in ((~replace, False), (replace, True)):
        if bool(rows.any()):
            neg[rows] = torch.multinomial(weights[rows], k, replacement=with_replacement)
    return torch.cat([index.reshape(-1, 1), neg], dim=1)


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
                 negatives: Literal["other_class", "uniform"] = "other_class",
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
        self.negatives = negatives
        # None: the training-set size, from bind(). Set it only to use the term without an engine.
        self.num_data = None if num_data is None else int(num_data)
        # The training labels (for other_class negatives); data, not state: not saved in checkpoints.
        self.register_buffer("labels", None, persistent=False)
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

    def bind(self, info: DataInfo) -> None:
        if self.num_data is not None and self.num_data != int(info.num_data):
            raise ValueError(f"distill.crd.num_data={self.num_data} but the training set has {info.num_data} "
                             "samples (one memory row per sample); leave num_data unset.")
        self.num_data = int(info.num_data)
        if info.labels is not None:
            labels = torch.as_tensor(info.labels).long().reshape(-1)
            if labels.numel() != self.num_data:
                raise ValueError(f"CRD: DataInfo.labels has {labels.numel()} entries for {self.num_data} samples")
            self.labels = labels.to(self.memory_s.device)

    def setup(self, student: dict[str, Any], teacher: dict[str, Any]) -> None:
        if self.num_data is None:
            raise ValueError("distill.crd.num_data is not set and the engine did not provide the "
                             "training-set size (bind(DataInfo(num_data, ...)) before setup).")
        if self.negatives == "other_class" and self.labels is None:
            raise ValueError("distill.crd.negatives=other_class draws the negatives from other classes, as "
                             "RepDistiller's CIFAR-100 benchmark does, and needs the training labels, but the "
                             "data set gave none (DataModule.train_labels() is None). Valid choices: "
                             "other_class (needs labels), uniform.")
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
            elif self.negatives == "other_class":
                if self.labels is None:
                    raise RuntimeError("CRD negatives=other_class: no training labels were bound")
                idx = other_class_negatives(index, self.labels.to(index.device), k)
                self._last_negatives = (index, idx)
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
