"""COCO evaluation (pycocotools) of hand-made detection files, the task's evaluate(), and TIDE."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from kdrun.data.coco import build, make_synthetic_coco
from kdrun.models.taps import ModelOutput
from kdrun.models.vidt import vidt_nano
from kdrun.tasks.detection import METRIC_KEYS, Detection, coco_evaluate
from kdrun.analysis.tide import MAIN_ERRORS, plot_tide, tide


def _gt(root: Path) -> dict:
    return json.loads((root / "annotations" / "instances_val2017.json").read_text())


def test_perfect_detections_score_one_and_none_score_zero(synthetic_root: Path, tmp_path: Path) -> None:
    ann = synthetic_root / "annotations" / "instances_val2017.json"
    gt = _gt(synthetic_root)
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                "score": 0.5 + 0.4 * (i % 2)} for i, a in enumerate(gt["annotations"])]
    path = tmp_path / "perfect.json"
    path.write_text(json.dumps(perfect))
    m = coco_evaluate(str(ann), str(path))
    assert m["AP"] == pytest.approx(1.0) and m["AP50"] == pytest.approx(1.0) and m["AP75"] == pytest.approx(1.0)
    for k in ("APs", "APm", "APl"):  # 1, or -1 where the set has no object of that size
        assert m[k] == pytest.approx(1.0) or m[k] == -1.0
    assert m["images"] == len(gt["images"])
    empty = coco_evaluate(str(ann), [])
    assert all(empty[k] == 0.0 for k in METRIC_KEYS)
    # half the objects found: AP strictly between
    half = coco_evaluate(str(ann), perfect[::2])
    assert 0.0 < half["AP"] < 1.0
    # wrong classes: next to nothing matches (only where shapes of two classes happen to overlap)
    wrong = [dict(d, category_id=d["category_id"] % 3 + 1) for d in perfect]
    assert coco_evaluate(str(ann), wrong)["AP"] < 0.05


def test_detections_convert_model_outputs_to_coco_json(synthetic_root: Path) -> None:
    """An oracle output (the targets as predictions) survives post-processing and the conversion to
    original-image xywh: AP 1."""
    dm = build(str(synthetic_root), num_classes=4, scales=[48], max_size=64, crop_scales=[40], crop_size=[32, 40],
               eval_size=48)
    task = Detection()
    dets = []
    loader = DataLoader(dm.val, batch_size=3, collate_fn=dm.collate_fn)
    for batch in loader:
        images, targets, _ = task.batch_to_device(batch, torch.device("cpu"))
        q = 5
        logits = torch.full((len(targets), q, 4), -10.0)
        boxes = torch.full((len(targets), q, 4), 0.5)
        for b, t in enumerate(targets):
            n = len(t["labels"])
            logits[b, torch.arange(n), t["labels"]] = 10.0
            boxes[b, :n] = t["boxes"]
        dets.extend(task.detections(ModelOutput(logits, {"pred_boxes": boxes}), targets))
    assert len(dets) == len(dm.val) * 5 * 4  # top-k capped at queries × classes
    m = coco_evaluate(dm.val.coco, dets)
    assert m["AP"] == pytest.approx(1.0, abs=1e-6)


def test_evaluate_runs_the_model_on_every_val_image_once(synthetic_root: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    dm = build(str(synthetic_root), num_classes=4, scales=[48], max_size=64, crop_scales=[40], crop_size=[32, 40],
               eval_size=48)
    task = Detection(topk=10)
    task.results_path = tmp_path / "out" / "detections.json"
    model = vidt_nano(num_classes=4, det_tokens=5, dec_layers=1).train()
    m = task.evaluate(model, DataLoader(dm.val, batch_size=3, collate_fn=dm.collate_fn), torch.device("cpu"),
                      torch.autocast("cpu", enabled=False))
    assert model.training  # restored
    assert set(METRIC_KEYS) <= set(m) and m["images"] == len(dm.val) and m["detections"] == 10 * len(dm.val)
    saved = json.loads(task.results_path.read_text())
    assert len(saved) == 10 * len(dm.val)
    assert {d["image_id"] for d in saved} == set(dm.val.ids)
    img = dm.val.coco.imgs[saved[0]["image_id"]]
    x, y, w, h = saved[0]["bbox"]  # original-image pixels
    assert -1e-3 <= x and x + w <= img["width"] + 1e-3 and y + h <= img["height"] + 1e-3


@pytest.fixture(scope="module")
def one_object_set(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = make_synthetic_coco(tmp_path_factory.mktemp("one"), num_train=1, num_val=12, image_size=64,
                               num_classes=3, max_objects=1, seed=5)
    return _gt(root)


def _crafted(gt: dict) -> list[dict]:
    """Detections with one instance of each TIDE error type (see the per-image comments)."""
    by_image = {a["image_id"]: a for a in gt["annotations"]}
    dets = []
    for i, im in enumerate(sorted(gt["images"], key=lambda m: m["id"])):
        a = by_image[im["id"]]
        x, y, w, h = a["bbox"]
        c, other = a["category_id"], a["category_id"] % 3 + 1

        def add(cat: int, box: list, score: float) -> None:
            dets.append({"image_id": im["id"], "category_id": cat, "bbox": box, "score": score})

        shifted = [x + 0.6 * w, y, w, h]  # IoU 0.25: between t_b = 0.1 and t_f = 0.5
        if i == 3:
            add(other, [x, y, w, h], 0.9)           # Cls: right box, wrong class
        elif i == 4:
            add(c, shifted, 0.9)                    # Loc: right class, poor box
        elif i == 5:
            add(other, shifted, 0.9)                # Both: wrong class and poor box
        elif i == 6:
            add(c, [x, y, w, h], 0.6)
            add(c, [x + 1, y, w, h], 0.55)          # Dupe: the object was already found
        elif i == 7:
            add(c, [x, y, w, h], 0.3)
            corner = [0.0, 0.0, 2.0, 2.0] if x > 4 or y > 4 else [im["width"] - 2.0, im["height"] - 2.0, 2.0, 2.0]
            add(c, corner, 0.9)                     # Bkg: nothing there
        elif i == 8:
            pass                                    # Miss
        else:
            add(c, [x, y, w, h], 0.3)               # true positives
    return dets


def test_tide_finds_all_six_error_types(one_object_set: dict, tmp_path: Path) -> None:
    res = tide(one_object_set, _crafted(one_object_set))
    assert set(res.main_errors) == set(MAIN_ERRORS) == {"Cls", "Loc", "Both", "Dupe", "Bkg", "Miss"}
    # Both leaves its object unclaimed, so it is missed as well
    assert res.counts == {"Cls": 1, "Loc": 1, "Both": 1, "Dupe": 1, "Bkg": 1, "Miss": 2}
    assert all(v > 0 for v in res.main_errors.values()), res.main_errors
    assert 0 < res.ap < 100 and res.special_errors["FalsePos"] > 0 and res.special_errors["FalseNeg"] > 0
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in one_object_set["annotations"]]
    clean = tide(one_object_set, perfect)
    assert clean.ap == pytest.approx(100.0) and all(v == 0 for v in clean.main_errors.values())
    png = plot_tide([("crafted", res), ("perfect", clean)], tmp_path / "tide.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tide_agrees_with_tidecv(one_object_set: dict, synthetic_root: Path) -> None:
    """The reference implementation, where it is installed (it is not a kdrun dependency)."""
    tidecv = pytest.importorskip("tidecv")
    import random

    rng = random.Random(0)
    gt = _gt(synthetic_root)
    dets = []
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        for _ in range(rng.randint(0, 2)):
            dx, dy = rng.uniform(-0.5, 0.5) * w, rng.uniform(-0.5, 0.5) * h
            dets.append({"image_id": a["image_id"], "category_id": rng.choice([a["category_id"], 1, 2, 3]),
                         "bbox": [x + dx, y + dy, w, h], "score": rng.random()})
    for cases in ((one_object_set, _crafted(one_object_set)), (gt, dets)):
        g, p = tidecv.Data("gt"), tidecv.Data("pred")
        for im in cases[0]["images"]:
            g.add_image(im["id"], im["file_name"])
        for a in cases[0]["annotations"]:
            g.add_ground_truth(a["image_id"], a["category_id"], a["bbox"])
        for d in cases[1]:
            p.add_detection(d["image_id"], d["category_id"], d["score"], d["bbox"])
        ref = tidecv.TIDE()
        ref.evaluate(g, p, mode=tidecv.TIDE.BOX)
        run = list(ref.runs.values())[0]
        ours = tide(cases[0], cases[1])
        assert ours.ap == pytest.approx(run.ap, abs=1e-6)
        for err, v in run.fix_main_errors().items():
            assert ours.main_errors[err.short_name] == pytest.approx(v, abs=1e-6), err.short_name
