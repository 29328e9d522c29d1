"""ImageNet-pretrained Swin weights for the ViDT body (``backbone_weights=``), as ViDT initialises it.

ViDT (Song et al., ICLR 2022) trains every detector from an ImageNet-pretrained Swin body; only the
[DET]-token parts (``det_token``, ``det_pos_embed``, every block's ``det_pos_linear``), the last stage's
patch merging (plain Swin has none after stage 4) and the neck/heads start from scratch. Sources:

* a path to a checkpoint in the **Microsoft Swin release format** (``{"model": state_dict}`` with
  ``patch_embed.*``, ``layers.<i>.blocks.<j>.*``, ``layers.<i>.downsample.*`` for i < 3, ``norm.*``,
  ``head.*``) — what the ViDT README points to: Microsoft's Swin-tiny/small/base ImageNet checkpoints
  and ViDT's own Swin-nano (``swin_nano_patch4_window7_224.pth``, only published by ViDT);
* ``"timm"``: timm's weights of the same Swin (:data:`TIMM_NAMES`; ``timm.create_model(...,
  pretrained=True)``, downloaded into timm's/Hugging Face's cache). timm keys are converted to the
  Microsoft layout: timm puts each patch merging at the *start* of the next stage
  (``layers.<i+1>.downsample``), Microsoft and kdrun at the *end* of the stage (``layers.<i>.downsample``);
  the 2×2 merge order of the two is the same (tested against timm's own ``PatchMerging``).

Dropped from the source: the classifier (``head.*``), the final ``norm.*`` and the buffers
``relative_position_index``/``attn_mask`` (kdrun builds its own). Every remaining tensor must exist in
the body with the same shape, and every body tensor that the source lacks must be one of the
ViDT-only parts above; anything else raises a :class:`~kdrun.models.build.CheckpointError` naming
the keys (e.g. Swin-tiny weights offered to a Swin-small body).
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping

import torch
from torch import Tensor, nn

# The ImageNet Swin that ViDT starts each body from (ViDT README: Swin-base from ImageNet-22K).
TIMM_NAMES = {
    "tiny": "swin_tiny_patch4_window7_224.ms_in1k",
    "small": "swin_small_patch4_window7_224.ms_in1k",
    "base": "swin_base_patch4_window7_224.ms_in22k",
}

_DROP = re.compile(r"^(head\.|norm\.)|relative_position_index$|attn_mask$")
# Body tensors that plain Swin does not have: they start from their initialisation, as in ViDT.
_VIDT_ONLY = re.compile(r"^det_token$|^det_pos_embed$|\.det_pos_linear\.|relative_position_index$")


def from_timm(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """timm Swin state_dict → Microsoft layout (patch merging moved to the end of the previous stage)."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"^layers\.(\d+)\.downsample\.(.*)$", k)
        if m:
            k = f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
        out[k.replace("head.fc.", "head.")] = v
    return out


def _is_timm_layout(sd: Mapping[str, Tensor]) -> bool:
    return any(k.startswith("layers.1.downsample.") for k in sd) and not any(
        k.startswith("layers.0.downsample.") for k in sd)


def convert_swin_state_dict(sd: Mapping[str, Any]) -> dict[str, Tensor]:
    """A Microsoft- or timm-layout Swin state_dict → the keys of kdrun's ViDT body."""
    if "model" in sd and isinstance(sd["model"], Mapping):
        sd = sd["model"]
    sd = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in sd.items()}
    if _is_timm_layout(sd):
        sd = from_timm(sd)
    return {k: v for k, v in sd.items() if not _DROP.search(k)}


def _timm_state_dict(variant: str) -> dict[str, Tensor]:
    import timm

    from kdrun.models.build import CheckpointError

    if variant not in TIMM_NAMES:
        raise CheckpointError(
            f"backbone_weights=timm: timm has no Swin-{variant}. ViDT's Swin-nano ImageNet weights are only "
            "published by ViDT (swin_nano_patch4_window7_224.pth, linked from the naver-ai/vidt README); "
            "pass its path as backbone_weights=PATH.")
    try:
        return timm.create_model(TIMM_NAMES[variant], pretrained=True).state_dict()
    except Exception as e:  # network, missing cache, hub errors: one paragraph, not a stack of them
        raise CheckpointError(
            f"backbone_weights=timm: could not get timm's {TIMM_NAMES[variant]} pretrained weights "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Offline, download them once "
            "where there is network (they land in the Hugging Face cache) or pass a Microsoft Swin "
            "checkpoint as backbone_weights=PATH.") from None


def load_backbone(body: nn.Module, source: str | os.PathLike | Mapping[str, Any], variant: str) -> dict[str, int]:
    """Load ImageNet Swin weights into a ViDT body; returns counts of loaded and fresh tensors."""
    from kdrun.models.build import CheckpointError, show_keys, state_dict_mismatch

    if isinstance(source, Mapping):
        raw, where = source, "<state_dict>"
    elif str(source) == "timm":
        raw, where = _timm_state_dict(variant), f"timm:{TIMM_NAMES.get(variant)}"
    else:
        where = os.path.expanduser(str(source))
        if not os.path.isfile(where):
            raise CheckpointError(f"backbone weights {where} do not exist (an ImageNet Swin checkpoint in the "
                                  "Microsoft release format, or backbone_weights=timm).")
        raw = torch.load(where, map_location="cpu", weights_only=True)
    sd = convert_swin_state_dict(raw)
    own = body.state_dict()
    missing, unexpected, shapes = state_dict_mismatch(own, sd)
    last_merge = f"layers.{len(body.layers) - 1}.downsample."  # type: ignore[arg-type]
    missing = [k for k in missing if not _VIDT_ONLY.search(k) and not k.startswith(last_merge)]
    if unexpected or shapes or missing:
        raise CheckpointError(
            f"backbone weights {where} do not fit the Swin-{variant} body of ViDT: unexpected keys "
            f"[{show_keys(unexpected, 6)}], shape mismatches (checkpoint vs model) [{show_keys(shapes, 6)}], "
            f"missing keys [{show_keys(missing, 6)}]. Is it a checkpoint of another Swin size?")
    body.load_state_dict(sd, strict=False)
    return {"loaded": len(sd), "fresh": len(own) - len(sd)}
