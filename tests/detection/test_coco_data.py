"""COCO data: the synthetic generator, target preparation, DETR transforms, padded collate, layout errors."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from kdrun.data.base import DatasetError
from kdrun.data.coco import (DETR_SCALES, build, build_synthetic, collate, crop, hflip, make_synthetic_coco,
                             resize, _resize_size)
from kdrun.models.vidt import ImageBatch

ROOT = Path(__file__).resolve().parents[2]


def test_synthetic_coco_layout_and_annotations(synthetic_root: Path) -> None:
    for split in ("train2017", "val2017"):
        data = json.loads((synthetic_root / "annotations" / f"instances_{split}.json").read_text())
        assert [c["id"] for c in data["categories"]] == [1, 2, 3]
        assert len(data["images"]) == (6 if split == "train2017" else 8)
        ids = {im["id"] for im in data["images"]}
        for a in data["annotations"]:
            assert a["image_id"] in ids and a["category_id"] in (1, 2, 3) and a["iscrowd"] == 0
            x, y, w, h = a["bbox"]
            im = next(i for i in data["images"] if i["id"] == a["image_id"])
            assert 0 <= x and 0 <= y and x + w <= im["width"] and y + h <= im["height"] and w >= 8
        for im in data["images"]:
            with Image.open(synthetic_root / split / im["file_name"]) as img:
                assert img.size == (im["width"], im["height"])
    # the drawn shape is where its box says: the box centre has the class colour, not the background
    data = json.loads((synthetic_root / "annotations" / "instances_train2017.json").read_text())
    a = data["annotations"][-1]  # drawn last: nothing covers it
    im = next(i for i in data["images"] if i["id"] == a["image_id"])
    with Image.open(synthetic_root / "train2017" / im["file_name"]) as img:
        x, y, w, h = a["bbox"]
        r, g, b = img.getpixel((int(x + w / 2), int(y + h / 2)))
    from kdrun.data.coco import PALETTE

    assert max(abs(u - v) for u, v in zip((r, g, b), PALETTE[a["category_id"] - 1])) <= 21


def test_script_is_a_command_line_and_a_function(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import make_synthetic_coco as script
    finally:
        sys.path.pop(0)
    assert script.make_synthetic_coco is make_synthetic_coco
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_synthetic_coco.py"), str(tmp_path / "s"),
                          "--train", "2", "--val", "1", "--image-size", "48", "--classes", "2"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "s" / "annotations" / "instances_val2017.json").is_file()


def test_missing_root_names_the_expected_layout(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"does not exist[\s\S]*train2017/[\s\S]*instances_val2017.json"):
        build(str(tmp_path / "nowhere"))
    (tmp_path / "coco" / "train2017").mkdir(parents=True)
    with pytest.raises(DatasetError, match="instances_train2017.json is missing"):
        build(str(tmp_path / "coco"))


def test_dataset_targets_and_eval_transform(synthetic_root: Path) -> None:
    dm = build(str(synthetic_root), num_classes=4, scales=[48, 64], max_size=80, crop_scales=[40, 48],
               crop_size=[32, 48], eval_size=64)
    assert dm.num_classes == 4 and dm.collate_fn is collate and len(dm.val) == 8
    x, t = dm.val[0]
    h, w = x.shape[1:]
    assert min(h, w) == 64 or max(h, w) == 80  # the shorter side 64 unless the longer would pass 80
    assert set(t) >= {"boxes", "labels", "image_id", "orig_size", "size", "area", "iscrowd"}
    assert t["size"].tolist() == [h, w]
    # boxes: cxcywh in [0, 1] of the resized image, matching the json boxes scaled to the original size
    img_info = dm.val.coco.imgs[t["image_id"]]
    anns = [a for a in dm.val.coco.imgToAnns[t["image_id"]]]
    assert t["orig_size"].tolist() == [img_info["height"], img_info["width"]]
    cx, cy, bw, bh = t["boxes"][0].tolist()
    ox, oy, ow, oh = anns[0]["bbox"]
    assert (cx - bw / 2) * img_info["width"] == pytest.approx(ox, abs=1e-3)
    assert bh * img_info["height"] == pytest.approx(oh, abs=1e-3)
    assert t["labels"].tolist() == [a["category_id"] for a in anns]
    with pytest.raises(DatasetError, match="category id 3"):
        build(str(synthetic_root), num_classes=3)


def test_training_transform_keeps_boxes_consistent(synthetic_root: Path) -> None:
    dm = build(str(synthetic_root), num_classes=4, scales=[48, 56, 64], max_size=80, crop_scales=[40, 48],
               crop_size=[32, 48], eval_size=64)
    random.seed(0)
    for i in range(24):
        x, t = dm.train[i % len(dm.train)]
        assert x.shape[0] == 3 and max(x.shape[1:]) <= 80
        b = t["boxes"]
        assert ((b[:, :2] >= 0) & (b[:, :2] <= 1)).all() and (b[:, 2:] > 0).all() and (b[:, 2:] <= 1 + 1e-6).all()
        assert len(t["labels"]) == len(b) == len(t["area"])


def test_detr_resize_flip_crop_on_a_known_box() -> None:
    assert _resize_size(1000, 500, 800, 1333) == (666, 1332)  # the longer side caps the scale (DETR rounding)
    assert _resize_size(640, 480, 480, 1333) == (480, 640)
    assert DETR_SCALES == tuple(range(480, 801, 32)) and len(DETR_SCALES) == 11
    img = Image.new("RGB", (100, 50))
    t = {"boxes": torch.tensor([[10.0, 5.0, 30.0, 25.0]]), "labels": torch.tensor([2]), "area": torch.tensor([400.0]),
         "iscrowd": torch.tensor([0]), "size": torch.tensor([50, 100])}
    img2, t2 = resize(img, t, 25, None)
    assert img2.size == (50, 25) and torch.allclose(t2["boxes"], torch.tensor([[5.0, 2.5, 15.0, 12.5]]))
    assert t2["area"].item() == pytest.approx(100.0)
    img3, t3 = hflip(img, t)
    assert torch.allclose(t3["boxes"], torch.tensor([[70.0, 5.0, 90.0, 25.0]]))
    img4, t4 = crop(img, t, top=10, left=20, h=30, w=40)
    assert img4.size == (40, 30) and torch.allclose(t4["boxes"], torch.tensor([[0.0, 0.0, 10.0, 15.0]]))
    _, t5 = crop(img, t, top=30, left=50, h=20, w=50)  # the box falls outside: dropped with its label
    assert len(t5["boxes"]) == 0 and len(t5["labels"]) == 0


def test_collate_pads_and_masks() -> None:
    a, b = torch.ones(3, 4, 6), torch.full((3, 5, 2), 2.0)
    batch, targets = collate([(a, {"i": 0}), (b, {"i": 1})])
    assert isinstance(batch, ImageBatch) and batch.tensors.shape == (2, 3, 5, 6)
    assert targets == [{"i": 0}, {"i": 1}]
    assert batch.mask[0, :4, :6].logical_not().all() and batch.mask[0, 4].all()
    assert batch.mask[1, :, 2:].all() and not batch.mask[1, :, :2].any()
    assert (batch.tensors[0, :, 4] == 0).all() and (batch.tensors[1, :, :, :2] == 2).all()


def test_build_synthetic_caches_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDRUN_CACHE", str(tmp_path))
    dm = build_synthetic(train_size=3, val_size=2, image_size=48, num_classes=3)
    dm2 = build_synthetic(train_size=3, val_size=2, image_size=48, num_classes=3)
    roots = list((tmp_path / "coco_synthetic").iterdir())
    assert len(roots) == 1 and len(dm.train) == 3 and len(dm2.val) == 2 and dm.num_classes == 3
