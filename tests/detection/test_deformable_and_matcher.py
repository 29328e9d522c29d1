"""Pure-PyTorch deformable attention against the per-point oracle; the Hungarian matcher against brute force."""
from __future__ import annotations

import itertools

import pytest
import torch

from kdrun.models.vidt.deformable import MSDeformAttn, ms_deform_attn, ms_deform_attn_naive
from kdrun.models.vidt.matcher import HungarianMatcher, matching_cost


def _inputs(seed: int, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 6), (3, 2), (1, 4)]
    n, lq, m, d, p = 2, 3, 2, 4, 3
    s = sum(h * w for h, w in shapes)
    value = torch.randn(n, s, m, d, generator=g, dtype=dtype)
    # locations partly outside [0, 1]: those corners read zeros
    loc = (torch.rand(n, lq, m, len(shapes), p, 2, generator=g, dtype=dtype) * 1.4 - 0.2)
    attn = torch.rand(n, lq, m, len(shapes), p, generator=g, dtype=dtype)
    attn = attn / attn.sum(dim=(-1, -2), keepdim=True)
    return value, shapes, loc, attn


@pytest.mark.parametrize("seed", [0, 1])
def test_grid_sample_core_matches_per_point_loop_values_and_gradients(seed: int) -> None:
    value, shapes, loc, attn = _inputs(seed)
    leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
    out = ms_deform_attn(leaves[0], shapes, leaves[1], leaves[2])
    ref_leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
    ref = ms_deform_attn_naive(ref_leaves[0], shapes, ref_leaves[1], ref_leaves[2])
    assert out.shape == ref.shape == (2, 3, 8)
    assert torch.allclose(out, ref, atol=1e-10)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    for a, b, name in zip(leaves, ref_leaves, ("value", "locations", "weights")):
        assert torch.allclose(a.grad, b.grad, atol=1e-9), name
    # the spatial shapes may come as a tensor (the release's form)
    assert torch.allclose(ms_deform_attn(value, torch.tensor(shapes), loc, attn), out.detach())


def test_ms_deform_attn_module_points_and_boxes() -> None:
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2)
    # the release's initialisation: offsets on rays 1..P pixels, uniform attention
    assert torch.allclose(attn.sampling_offsets.weight, torch.zeros_like(attn.sampling_offsets.weight))
    shapes = [(6, 5), (3, 3)]
    src = torch.randn(2, 39, 32)
    pad = torch.zeros(2, 39, dtype=torch.bool)
    pad[1, 25:30] = True
    q = torch.randn(2, 7, 32)
    for ref in (torch.rand(2, 7, 2, 2), torch.rand(2, 7, 2, 4)):
        out = attn(q, ref, src, shapes, pad)
        assert out.shape == (2, 7, 32) and torch.isfinite(out).all()
    # padded value tokens are zeroed: changing them changes nothing
    src2 = src.clone()
    src2[1, 25:30] = 100.0
    ref = torch.rand(2, 7, 2, 2)
    assert torch.allclose(attn(q, ref, src, shapes, pad), attn(q, ref, src2, shapes, pad), atol=1e-6)
    with pytest.raises(ValueError, match="2 or 4"):
        attn(q, torch.rand(2, 7, 2, 3), src, shapes, pad)


def _brute_force(cost: torch.Tensor) -> float:
    q, n = cost.shape
    return min(sum(cost[i, j].item() for j, i in enumerate(perm)) for perm in itertools.permutations(range(q), n))


@pytest.mark.parametrize("seed", range(6))
def test_hungarian_matcher_is_optimal(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    q, c = 6, 5
    sizes = [seed % 4 + 1, 3, 0]
    logits = torch.randn(3, q, c, generator=g)
    boxes = torch.rand(3, q, 4, generator=g) * 0.5 + 0.25
    targets = [{"labels": torch.randint(0, c, (k,), generator=g), "boxes": torch.rand(k, 4, generator=g) * 0.5 + 0.25}
               for k in sizes]
    matcher = HungarianMatcher()
    indices = matcher(logits, boxes, targets)
    for b, ((rows, cols), t) in enumerate(zip(indices, targets)):
        assert len(rows) == len(cols) == len(t["labels"])
        assert len(set(rows.tolist())) == len(rows) and sorted(cols.tolist()) == list(range(len(cols)))
        if not len(t["labels"]):
            continue
        cost = matching_cost(logits[b], boxes[b], t["labels"], t["boxes"])
        assert cost.shape == (q, len(t["labels"]))
        got = sum(cost[i, j].item() for i, j in zip(rows.tolist(), cols.tolist()))
        assert got == pytest.approx(_brute_force(cost), abs=1e-5)


def test_matching_cost_components() -> None:
    # one prediction equal to the target box with a confident right class costs least
    logits = torch.tensor([[8.0, -8.0], [-8.0, 8.0]])
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]])
    cost = matching_cost(logits, boxes, torch.tensor([0]), torch.tensor([[0.5, 0.5, 0.2, 0.2]]))
    assert cost[0, 0] < cost[1, 0]
    # equal boxes: L1 0 and GIoU 1, so the cost is 2·(FL⁺ − FL⁻) − 2
    p = torch.sigmoid(torch.tensor(8.0))
    fl = 0.25 * (1 - p) ** 2 * -torch.log(p + 1e-8) - 0.75 * p ** 2 * -torch.log(1 - p + 1e-8)
    assert cost[0, 0].item() == pytest.approx((2 * fl - 2).item(), rel=1e-5)
