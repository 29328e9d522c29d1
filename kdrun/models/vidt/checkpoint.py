"""Load state_dicts of the original ViDT release (``naver-ai/vidt``) into :class:`~kdrun.models.vidt.ViDT`.

kdrun's module tree mirrors the release's (``methods/swin_w_ram.py``,
``methods/vidt/deformable_transformer.py``, ``methods/vidt/detector.py``, ``ops/modules/ms_deform_attn.py``),
so every parameter that the release *uses* has the same name and shape here. The mapping only drops
what the release registers but never uses in a ViDT forward pass, which kdrun does not build (unused
parameters would get no gradient, which DDP and the per-objective Jacobians of gradient-level
balancers would have to special-case):

* ``backbone.norm1/2/3.*``: per-stage output norms kept in the release only "to load the pre-trained
  model" (its comment: "Not used in the current version");
* ``backbone.layers.<i>.downsample.expansion.weight`` and ``…downsample.norm2.*``: "added for detection
  token [please ignore, not used for training]";
* ``transformer.level_embed``: the level embedding of the removed encoder;
* ``transformer.decoder.bbox_embed.*``: the release registers the detector's box heads a second time
  inside the decoder (its box-refinement "hack"); they are the same tensors as ``bbox_embed.*``;
* ViDT+ / optional modules never built by kdrun (``fusion.*``, ``vector_embed.*``, ``iou_embed.*``,
  ``transformer.enc_output*``, ``transformer.token_embed.*``) are dropped too, so a checkpoint of a
  ViDT+ model fails on its *missing* keys only if it changes shapes or uses EPFF.

``module.`` prefixes are stripped and ``{"model": state_dict}`` wrappers unwrapped. The names were derived
from the release's source code, not checked against a downloaded checkpoint (no network here).
"""
from __future__ import annotations

import argparse
import os
import re
from typing import Any, Mapping

import torch
from torch import Tensor, nn

DROPPED = (
    re.compile(r"^backbone\.norm\d+\."),
    re.compile(r"^backbone\.layers\.\d+\.downsample\.(expansion|norm2)\."),
    re.compile(r"^transformer\.level_embed$"),
    re.compile(r"^transformer\.decoder\.(bbox_embed|class_embed)\."),
    re.compile(r"^(fusion|vector_embed|iou_embed)\."),
    re.compile(r"^transformer\.(enc_output|enc_output_norm|token_embed)\b"),
)


def convert_original_state_dict(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Map an original-release ViDT state_dict onto kdrun's names (drop the unused entries above)."""
    if "model" in sd and isinstance(sd["model"], Mapping):
        sd = sd["model"]  # type: ignore[assignment]
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("module.")
        if any(p.search(k) for p in DROPPED):
            continue
        out[k] = v
    return out


def load_original(model: nn.Module, source: str | os.PathLike | Mapping[str, Any]) -> None:
    """Load an original-release checkpoint (path or state_dict) strictly after
    :func:`convert_original_state_dict`; mismatches raise a
    :class:`~kdrun.models.build.CheckpointError` that names the keys."""
    from kdrun.models.build import CheckpointError, check_fits

    if isinstance(source, Mapping):
        sd, where = source, "<state_dict>"
    else:
        where = str(source)
        if not os.path.isfile(os.path.expanduser(where)):
            raise CheckpointError(f"ViDT weights {where} do not exist.")
        # the release's checkpoints hold optimiser state and the argparse Namespace next to the model:
        # allow exactly that class, so loading stays weights_only (no arbitrary code from the file)
        with torch.serialization.safe_globals([argparse.Namespace]):
            sd = torch.load(os.path.expanduser(where), map_location="cpu", weights_only=True)
    converted = convert_original_state_dict(sd)  # type: ignore[arg-type]
    check_fits(model, converted, where)
    model.load_state_dict(converted)
