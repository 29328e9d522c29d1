"""ImageNet Swin weights into the ViDT body (kdrun.models.vidt.pretrained): timm and Microsoft layouts,
the ViDT-only parts left fresh, the merge order equal to timm's, and clear errors for misfits."""
from __future__ import annotations

import pytest
import timm
import torch

from kdrun.models.build import CheckpointError
from kdrun.models.vidt import vidt_nano, vidt_tiny
from kdrun.models.vidt.pretrained import TIMM_NAMES, convert_swin_state_dict, load_backbone

DEPTHS = (2, 1, 1, 1)  # shallow bodies: the mapping is per stage/block, so depth does not matter


def _timm_swin() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(TIMM_NAMES["tiny"].split(".")[0], pretrained=False, depths=DEPTHS).eval()


def test_timm_weights_load_and_mean_the_same_thing() -> None:
    ref = _timm_swin()
    model = vidt_tiny(det_tokens=5, dec_layers=1, depths=DEPTHS)
    det_before = model.backbone.det_token.detach().clone()
    counts = load_backbone(model.backbone, ref.state_dict(), "tiny")
    body, tsd = model.backbone.state_dict(), ref.state_dict()
    assert counts["loaded"] == len([k for k in tsd if not k.startswith(("head.", "norm."))])
    for k, v in tsd.items():
        if k.startswith(("head.", "norm.")):
            continue
        mine = k
        if ".downsample." in k:  # timm: start of stage i+1; kdrun/Microsoft: end of stage i
            i = int(k.split(".")[1])
            mine = k.replace(f"layers.{i}.", f"layers.{i - 1}.", 1)
        assert torch.equal(body[mine], v), k
    assert torch.equal(model.backbone.det_token, det_before)  # ViDT-only parts stay as initialised
    # Same computation, not only the same tensors: patch embedding and 2×2 merging equal timm's.
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ours = model.backbone.patch_embed(x).permute(0, 2, 3, 1)  # → NHWC like timm
        torch.testing.assert_close(ours, ref.patch_embed(x))
        feat = torch.randn(2, 8, 8, 96)
        merged_timm = ref.layers[1].downsample(feat)
        merged = model.backbone.layers[0].downsample(feat.reshape(2, 64, 96), 8, 8)
        torch.testing.assert_close(merged.reshape(2, 4, 4, -1), merged_timm)


def test_microsoft_layout_file_loads(tmp_path) -> None:
    """A Microsoft-release checkpoint: {'model': sd} with end-of-stage merging, final norm, head and
    relative_position_index buffers; written to disk and loaded by path through the model builder."""
    src = vidt_tiny(det_tokens=5, dec_layers=1, depths=DEPTHS).backbone.state_dict()
    ms = {k: v.clone() for k, v in src.items()
          if not k.startswith(("det_", "layers.3.downsample")) and ".det_pos_linear." not in k}
    ms.update({"norm.weight": torch.ones(768), "norm.bias": torch.zeros(768),
               "head.weight": torch.zeros(1000, 768), "head.bias": torch.zeros(1000)})
    assert any(k.startswith("layers.0.downsample") for k in convert_swin_state_dict(ms))  # not taken for timm's
    path = tmp_path / "swin_tiny_patch4_window7_224.pth"
    torch.save({"model": ms}, path)
    model = vidt_tiny(det_tokens=5, dec_layers=1, depths=DEPTHS, backbone_weights=str(path))
    for k, v in ms.items():
        if not k.startswith(("norm.", "head.")):
            assert torch.equal(model.backbone.state_dict()[k], v), k


def test_misfits_and_bad_sources_are_named() -> None:
    nano = vidt_nano(det_tokens=5, dec_layers=1, depths=DEPTHS)
    with pytest.raises(CheckpointError, match=r"do not fit the Swin-nano body.*shape mismatches.*patch_embed"):
        load_backbone(nano.backbone, _timm_swin().state_dict(), "nano")  # tiny weights, nano body
    with pytest.raises(CheckpointError, match="timm has no Swin-nano.*swin_nano_patch4_window7_224.pth"):
        load_backbone(nano.backbone, "timm", "nano")
    with pytest.raises(CheckpointError, match="backbone weights /nonexistent.pth do not exist"):
        load_backbone(nano.backbone, "/nonexistent.pth", "nano")
    partial = {k: v for k, v in _timm_swin().state_dict().items() if "blocks.0.mlp" not in k}
    tiny = vidt_tiny(det_tokens=5, dec_layers=1, depths=DEPTHS)
    with pytest.raises(CheckpointError, match=r"missing keys \[layers\.0\.blocks\.0\.mlp"):
        load_backbone(tiny.backbone, partial, "tiny")
    with pytest.raises(ValueError, match="not both"):
        vidt_tiny(det_tokens=5, dec_layers=1, depths=DEPTHS, weights="a.pth", backbone_weights="timm")


def test_timm_download_failure_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*a: object, **k: object) -> None:
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(timm, "create_model", offline)
    tiny = vidt_tiny(det_tokens=5, dec_layers=1, depths=DEPTHS)
    with pytest.raises(CheckpointError, match="could not get timm's swin_tiny_patch4_window7_224.ms_in1k.*OSError"):
        load_backbone(tiny.backbone, "timm", "tiny")
