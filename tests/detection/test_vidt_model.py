"""The ViDT detector: parameter counts, a padded forward/backward, post-processing, taps, release key mapping."""
from __future__ import annotations

import pytest
import torch

from kdrun.models.taps import Tapped, count_params
from kdrun.models.vidt import ImageBatch, postprocess, vidt_base, vidt_nano, vidt_small, vidt_tiny
from kdrun.models.vidt.checkpoint import convert_original_state_dict, load_original
from kdrun.models.vidt.detector import ViDT
from kdrun.data.coco import collate

# Every parameter that a ViDT forward uses, at 91 classes (COCO). The release additionally registers
# parameters it never uses (see kdrun.models.vidt.checkpoint): adding them gives 15.73M / 37.96M / 60.46M /
# 99.96M, against the papers' 16M / 38M / 61M / 0.1B (ViDT Table 2, DTO-KD Table 3).
PINNED = {"nano": 15_529_797, "tiny": 37_372_629, "small": 59_874_789, "base": 99_000_915}
CONFIG = {"nano": (48, (2, 2, 6, 2)), "tiny": (96, (2, 2, 6, 2)), "small": (96, (2, 2, 18, 2)),
          "base": (128, (2, 2, 18, 2))}
PAPER_M = {"nano": 16, "tiny": 38, "small": 61, "base": 100}


def _unused_in_release(embed: int) -> int:
    """Parameters the release registers but never uses: per-stage output norms of stages 2-4, each patch
    merging's `expansion` (C → 2C, the last → 256) and `norm2` (LayerNorm C), and `transformer.level_embed`."""
    dims = [embed * 2 ** i for i in range(4)]
    norms = sum(2 * d for d in dims[1:])
    expansion = sum(d * (2 * d if i < 3 else 256) for i, d in enumerate(dims))
    norm2 = sum(2 * d for d in dims)
    return norms + expansion + norm2 + 4 * 256


@pytest.mark.parametrize("variant", ["nano", "tiny", "small", "base"])
def test_parameter_counts_are_pinned(variant: str) -> None:
    model = {"nano": vidt_nano, "tiny": vidt_tiny, "small": vidt_small, "base": vidt_base}[variant]()
    n = count_params(model)
    assert n == PINNED[variant]
    with_unused = n + _unused_in_release(CONFIG[variant][0])
    # within 1M of the papers' rounded numbers (small: 60.46M vs "61M", see the module comment)
    assert abs(with_unused / 1e6 - PAPER_M[variant]) < 1.0


def _padded_batch() -> ImageBatch:
    g = torch.Generator().manual_seed(0)
    samples = [(torch.randn(3, 64, 80, generator=g), {}), (torch.randn(3, 96, 64, generator=g), {})]
    batch, _ = collate(samples)
    return batch


def test_forward_backward_on_a_padded_batch() -> None:
    torch.manual_seed(0)
    model = vidt_nano(num_classes=5)
    batch = _padded_batch()
    assert batch.tensors.shape == (2, 3, 96, 80)
    assert batch.mask[0, 64:].all() and not batch.mask[0, :64].any() and batch.mask[1, :, 64:].all()
    out = model(batch)
    q, levels = 100, 7  # the body's [DET] tokens + 6 decoder layers
    assert out.logits.shape == (2, q, 5)
    f = out.features
    assert f["pred_boxes"].shape == (2, q, 4) and f["all_logits"].shape == (2, levels, q, 5)
    assert f["all_boxes"].shape == (2, levels, q, 4)
    assert torch.equal(f["all_logits"][:, -1], out.logits) and torch.equal(f["all_boxes"][:, -1], f["pred_boxes"])
    assert ((f["pred_boxes"] > 0) & (f["pred_boxes"] < 1)).all()
    # [PATCH] maps at strides 8/16/32/64 of the padded 96×80 input, projected to 256
    assert [tuple(f[f"patch_tokens_{i}"].shape) for i in range(4)] == \
        [(2, 256, 12, 10), (2, 256, 6, 5), (2, 256, 3, 3), (2, 256, 2, 2)]
    assert f["body_det_tokens"].shape == (2, q, 256) and f["neck_det_tokens"].shape == (2, levels, q, 256)
    assert torch.equal(f["neck_det_tokens"][:, 0], f["body_det_tokens"])
    loss = out.logits.sum() + f["all_boxes"].sum() + sum(f[f"patch_tokens_{i}"].mean() for i in range(4))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing  # every parameter takes part (unused ones were dropped on purpose)
    # the padding mask matters: the same pixels with a different mask give other outputs
    model.eval()
    with torch.no_grad():
        a = model(batch).logits
        b = model(ImageBatch(batch.tensors, torch.zeros_like(batch.mask))).logits
        c = model(batch.tensors).logits  # a bare tensor means "nothing padded"
    assert not torch.allclose(a, b) and torch.allclose(b, c)


def test_postprocess_top_k_over_queries_and_classes() -> None:
    logits = torch.full((1, 3, 4), -9.0)
    logits[0, 2, 1] = 5.0
    logits[0, 0, 3] = 3.0
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.1, 0.1, 0.1, 0.1], [0.25, 0.5, 0.5, 1.0]]])
    res = postprocess(logits, boxes, torch.tensor([[100, 200]]), topk=2)[0]
    assert res["labels"].tolist() == [1, 3]
    assert torch.allclose(res["scores"], torch.sigmoid(torch.tensor([5.0, 3.0])))
    # cxcywh in [0, 1] → absolute xyxy: image is 200 wide, 100 high
    assert torch.allclose(res["boxes"], torch.tensor([[0.0, 0.0, 100.0, 100.0], [80.0, 30.0, 120.0, 70.0]]))
    assert len(postprocess(logits, boxes, torch.tensor([[100, 200]]))[0]["scores"]) == 12  # 100 > 3·4


def test_feature_taps_resolve_to_modules() -> None:
    from kdrun.losses.token_matching import TokenMatching

    model = vidt_nano(num_classes=3, det_tokens=5, dec_layers=1)
    tapped = Tapped(model, TokenMatching.student_taps)  # raises TapError if a name does not resolve
    assert set(tapped.taps) == set(ViDT.FEATURE_TAPS)


def _release_layout(model: ViDT) -> dict[str, torch.Tensor]:
    """A state_dict in the original release's layout, built from its source: ours plus what it registers
    and never uses, the decoder's duplicate box heads, and a DDP prefix."""
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    dims = model.backbone.num_features
    for i in (1, 2, 3):
        sd[f"module.backbone.norm{i}.weight"] = torch.ones(dims[i])
        sd[f"module.backbone.norm{i}.bias"] = torch.zeros(dims[i])
    for i, d in enumerate(dims):
        sd[f"module.backbone.layers.{i}.downsample.expansion.weight"] = torch.zeros(2 * d if i < 3 else 256, d)
        sd[f"module.backbone.layers.{i}.downsample.norm2.weight"] = torch.ones(d)
        sd[f"module.backbone.layers.{i}.downsample.norm2.bias"] = torch.zeros(d)
    sd["module.transformer.level_embed"] = torch.zeros(4, 256)
    for k, v in model.bbox_embed.state_dict().items():
        sd[f"module.transformer.decoder.bbox_embed.{k}"] = v
    return {"model": sd}


def test_release_state_dict_maps_and_loads_strictly(tmp_path) -> None:
    from kdrun.models.build import CheckpointError

    torch.manual_seed(0)
    src = vidt_nano(num_classes=4, det_tokens=10, dec_layers=2)
    ckpt = _release_layout(src)
    converted = convert_original_state_dict(ckpt)
    assert set(converted) == set(src.state_dict())
    dst = vidt_nano(num_classes=4, det_tokens=10, dec_layers=2)
    path = tmp_path / "vidt_nano_release.pth"
    torch.save(ckpt, path)
    load_original(dst, path)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    # through the constructor, as teacher.model.weights=PATH does
    built = vidt_nano(num_classes=4, det_tokens=10, dec_layers=2, weights=str(path))
    assert torch.equal(built.backbone.det_token, src.backbone.det_token)
    # another class count is caught, naming the mismatch
    with pytest.raises(CheckpointError, match="class_embed"):
        load_original(vidt_nano(num_classes=91, det_tokens=10, dec_layers=2), path)
