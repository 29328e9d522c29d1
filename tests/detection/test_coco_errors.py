"""Issue #21 items 10 and 12: a COCO annotation file that cannot give real numbers, and a damaged
detections file for ``kdrun tide``, are one paragraph naming the file and what is wrong, exit status 2.

Before, a file without ``annotations`` (or with category ids the detector has no output for) trained and
reported AP −1.00, and a truncated file was a traceback from inside pycocotools or json."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest

from kdrun.data.base import DatasetError
from kdrun.data.coco import build, make_synthetic_coco

SMALL = dict(scales=[32], max_size=48, crop_scales=[24], crop_size=[16, 24], eval_size=32)


@pytest.fixture
def coco(tmp_path: Path) -> Path:
    """A tiny COCO-format set (category ids 1..3) of our own: each test damages it."""
    return make_synthetic_coco(tmp_path / "coco", num_train=2, num_val=2, image_size=32, num_classes=3,
                               max_objects=2, seed=1)


def ann_file(root: Path, split: str = "val2017") -> Path:
    return root / "annotations" / f"instances_{split}.json"


def edit(root: Path, change: Callable[[dict[str, Any]], None], split: str = "val2017") -> Path:
    path = ann_file(root, split)
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def kdrun(kdrun_cli: Callable[..., tuple[int, str, str]]) -> Callable[..., tuple[int, str]]:
    """``kdrun(*argv)`` → (exit status, stderr) of ``kdrun.cli.main`` in this process."""
    return lambda *argv: kdrun_cli(*argv)[::2]


def one_paragraph(err: str) -> str:
    assert err.startswith("kdrun: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("change,expected", [
    (lambda d: d.pop("annotations"), "has no `annotations` (its keys: images, categories, info, licenses); a COCO "
                                     "instances file (instances_<split>.json) holds images, annotations and "
                                     "categories"),
    (lambda d: d.update(annotations=[]), "has an empty `annotations` list: there is nothing to train on or evaluate"),
    (lambda d: d.pop("categories"), "has no `categories`"),
    (lambda d: d.update(images={}), "`images` is a JSON dict, not a list"),
    (lambda d: d["categories"].append({"id": 7, "name": "x"}),
     "has category id 7 that a detector with dataset.num_classes=4 outputs (ids 0..3) cannot represent; set "
     "dataset.num_classes=8 (the largest category id + 1; 91 for COCO)."),
    (lambda d: d["annotations"][0].update(category_id=5),
     "has category_id 5, which `categories` does not list (ids 1, 2, 3)"),
    (lambda d: d["annotations"][0].update(image_id=424242), "is of image 424242, which `images` does not list"),
    (lambda d: d["annotations"][0].pop("bbox"), "an annotation lacks an integer image_id and category_id or a bbox"),
])
def test_annotation_file_that_cannot_be_evaluated_is_named(coco: Path, change: Callable, expected: str) -> None:
    path = edit(coco, change)  # the val file: the train file is fine, so the message must name the right one
    with pytest.raises(DatasetError) as e:
        build(str(coco), num_classes=4, **SMALL)
    assert str(e.value).startswith(f"COCO annotation file {path}")
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_truncated_annotation_file_is_named(coco: Path) -> None:
    path = ann_file(coco, "train2017")
    text = path.read_text()
    path.write_text(text[: len(text) // 2])  # a copy that stopped halfway
    with pytest.raises(DatasetError, match=r"^COCO annotation file .*instances_train2017\.json is not valid JSON "
                                           r"\(it ends mid-value: truncated\?\): .*; download, copy or generate it "
                                           r"again\.$"):
        build(str(coco), num_classes=4, **SMALL)
    path.write_bytes(b"\x00\xff\xfe binary")
    with pytest.raises(DatasetError, match="is not text"):
        build(str(coco), num_classes=4, **SMALL)


def test_missing_image_file_is_found_before_training(coco: Path) -> None:
    data = json.loads(ann_file(coco, "train2017").read_text())
    (coco / "train2017" / data["images"][1]["file_name"]).unlink()
    with pytest.raises(DatasetError, match=r"^1 image\(s\) that .*instances_train2017\.json lists are not in "
                                           r".*train2017 \(e\.g\. "):
        build(str(coco), num_classes=4, **SMALL)


def test_an_intact_file_still_loads_and_evaluates(coco: Path) -> None:
    dm = build(str(coco), num_classes=4, **SMALL)
    assert len(dm.train) == 2 and len(dm.val) == 2
    assert sorted(dm.val.coco.getCatIds()) == [1, 2, 3] and dm.val.coco.getAnnIds()


def test_training_on_an_annotation_file_without_annotations_stops(kdrun: Callable, coco: Path, tmp_path: Path) -> None:
    """The CLI reports it as one paragraph (the error comes out of Hydra's instantiate) and trains nothing."""
    path = edit(coco, lambda d: d.pop("annotations"))
    code, err = kdrun("train", "task=detection", "dataset=coco", f"dataset.root={coco}", "dataset.num_classes=4",
                      "student=vidt_nano", "trainer.accelerator=cpu", f"hydra.run.dir={tmp_path / 'run'}",
                      "hydra/job_logging=none", "hydra/hydra_logging=none", "hydra.output_subdir=null")
    assert code == 2
    assert f"COCO annotation file {path} has no `annotations`" in one_paragraph(err)
    assert not (tmp_path / "run" / "results.json").exists()


# -- kdrun tide on damaged files ------------------------------------------------------------------------

def detections(coco: Path) -> list[dict[str, Any]]:
    gt = json.loads(ann_file(coco).read_text())
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
            for a in gt["annotations"]]


@pytest.mark.parametrize("content,expected", [
    (lambda good: good[: len(good) // 2], "is not valid JSON (it ends mid-value: truncated?)"),
    (lambda good: '{"image_id": 1}', "holds a JSON dict, not a COCO results list"),
    (lambda good: '[{"image_id": 1, "category_id": 1, "score": 0.5}]', "has an entry that is not a detection"),
    (lambda good: '[{"image_id": 999999, "category_id": 1, "bbox": [0, 0, 4, 4], "score": 0.5}]',
     "has detections of 1 image id(s) that the ground truth does not have (e.g. 999999)"),
])
def test_tide_on_a_damaged_detections_file_is_one_paragraph(kdrun: Callable, coco: Path, tmp_path: Path,
                                                           content: Callable[[str], str], expected: str) -> None:
    dets = tmp_path / "dets.json"
    dets.write_text(content(json.dumps(detections(coco))))
    run = tmp_path / "run"
    run.mkdir()
    code, err = kdrun("tide", str(run), "--gt", str(ann_file(coco)), "--detections", str(dets))
    assert code == 2
    line = one_paragraph(err)
    assert f"detections file {dets}" in line and expected in line
    assert not (run / "tide.png").exists()


def test_tide_on_a_damaged_ground_truth_is_one_paragraph(kdrun: Callable, coco: Path, tmp_path: Path) -> None:
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps(detections(coco)))
    gt = ann_file(coco)
    gt.write_text(gt.read_text()[:100])
    code, err = kdrun("tide", str(tmp_path), "--gt", str(gt), "--detections", str(dets))
    assert code == 2
    assert f"COCO annotation file {gt} is not valid JSON" in one_paragraph(err)
