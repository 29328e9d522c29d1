"""TIDE error analysis of box detections (Bolya, Foley, Hays & Hoffman, "TIDE: A General Toolbox for
Identifying Object Detection Errors", ECCV 2020) — the analysis of DTO-KD Fig. 4 / MoKD Fig. 5.

kdrun implements TIDE itself (numpy only) instead of depending on PyPI ``tidecv``: that package installs
on Python 3.11 / numpy 2 but pulls in opencv-python, seaborn, pandas and appdirs for plotting and dataset
download helpers this project does not need. The semantics follow ``tidecv`` 1.0.1 (the authors' code),
so the numbers agree with it (``tests/detection/test_tide.py`` compares the two when ``tidecv`` is
importable).

Per image, predictions (top ``max_dets`` by score) are matched greedily in score order to the unused
ground truth of their class with the highest IoU ≥ t_f (``pos_thresh`` 0.5); crowd annotations are
ignore regions. Every unmatched prediction gets the first error type that applies (t_b = ``bg_thresh``
0.1):

1. **Loc** — a ground truth of the right class has t_b ≤ IoU ≤ t_f;
2. **Cls** — a ground truth of another class has IoU ≥ t_f;
3. **Dupe** — the right-class ground truth with IoU ≥ t_f was already matched by a higher-scoring one;
4. **Bkg** — IoU ≤ t_b with every ground truth;
5. **Both** — anything else (wrong class and t_b < IoU < t_f).

6. **Miss** — a ground truth that no prediction matched and that no Cls/Loc error can claim.

Each type's weight is ΔAP: the AP@t_f after fixing *only* errors of that type minus the AP before
(clamped at 0, as TIDE). Fixes (TIDE §2.3): Cls → relabel to the ground-truth class, Loc → move the box
onto the ground truth (both become true positives, but for each ground truth only the highest-scoring
such prediction, and only if the ground truth was not matched; the others are suppressed); Dupe, Bkg,
Both → suppress the prediction; Miss → remove the ground truth from the count. AP is COCO's 101-point
interpolated AP, averaged over the classes that have ground truth or predictions, in points (×100), like
``tidecv``. The two "special" errors are reported too: FalsePos (all false positives scored 0) and
FalseNeg (all missed ground truth removed).
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

MAIN_ERRORS = ("Cls", "Loc", "Both", "Dupe", "Bkg", "Miss")
SPECIAL_ERRORS = ("FalsePos", "FalseNeg")


def box_iou_xywh(a: np.ndarray, b: np.ndarray, crowd: bool = False) -> np.ndarray:
    """Pairwise IoU of COCO ``xywh`` boxes ``[N, 4]`` × ``[M, 4]``; with ``crowd`` the denominator is the
    first box's area (pycocotools' ``iscrowd`` convention)."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    ax1, ay1, bx1, by1 = a[:, None, 0], a[:, None, 1], b[None, :, 0], b[None, :, 1]
    ax2, ay2 = ax1 + a[:, None, 2], ay1 + a[:, None, 3]
    bx2, by2 = bx1 + b[None, :, 2], by1 + b[None, :, 3]
    iw = np.clip(np.minimum(ax2, bx2) - np.maximum(ax1, bx1), 0, None)
    ih = np.clip(np.minimum(ay2, by2) - np.maximum(ay1, by1), 0, None)
    inter = iw * ih
    area_a = (a[:, 2] * a[:, 3])[:, None]
    union = area_a if crowd else area_a + (b[:, 2] * b[:, 3])[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def average_precision(points: Sequence[tuple[float, bool]], num_gt: int) -> float:
    """COCO's 101-point interpolated AP (×100) of (score, is_true_positive) points against ``num_gt``."""
    if num_gt <= 0:
        return 0.0
    order = sorted(points, key=lambda p: -p[0])  # stable: ties keep insertion order
    tp = np.cumsum([1.0 if c else 0.0 for _, c in order])
    fp = np.cumsum([0.0 if c else 1.0 for _, c in order])
    if len(order) == 0:
        return 0.0
    precision = tp / (tp + fp)
    recall = tp / num_gt
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # the monotone envelope
    # recall levels as k/100 (tidecv's values; np.linspace differs in the last bit, which moves
    # searchsorted at recalls such as 7/20)
    idx = np.searchsorted(recall, np.arange(101) / 100, side="left")
    y = np.where(idx < len(precision), precision[np.minimum(idx, len(precision) - 1)], 0.0)
    return float(y.mean() * 100)


@dataclass
class _GT:
    key: tuple[int, int]  # (image id, index among the image's non-ignored ground truth)
    cls: int
    used: bool = False
    usable: bool = False
    best_score: float = -1.0
    best_id: int = -1


@dataclass
class _Error:
    kind: str
    cls: int  # class of the original data point (prediction) or of the missed ground truth
    pred_id: int = -1
    score: float = 0.0
    ignored: bool = False  # the prediction fell in an ignore region (no original data point)
    gt: _GT | None = None
    suppressed: bool = False

    def original(self) -> tuple[int, tuple[float, bool]] | None:
        if self.kind == "Miss" or self.ignored:
            return None
        return self.cls, (self.score, False)

    def fixed(self) -> tuple[int, tuple[float, bool] | int] | None:
        if self.kind == "Miss":
            return self.cls, -1  # one ground truth fewer
        if self.kind in ("Cls", "Loc"):
            assert self.gt is not None
            if self.suppressed or self.gt.best_id != self.pred_id:
                return None
            return (self.gt.cls if self.kind == "Cls" else self.cls), (self.score, True)
        return None


@dataclass
class TideResult:
    """TIDE's summary: AP@``pos_thresh`` (points), ΔAP per main and special error type, error counts."""

    ap: float
    main_errors: dict[str, float]
    special_errors: dict[str, float]
    counts: dict[str, int]
    pos_thresh: float = 0.5
    bg_thresh: float = 0.1
    extras: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"ap": self.ap, "main_errors": dict(self.main_errors), "special_errors": dict(self.special_errors),
                "counts": dict(self.counts), "pos_thresh": self.pos_thresh, "bg_thresh": self.bg_thresh}


def _load_gt(gt: Any) -> dict[str, Any]:
    if hasattr(gt, "dataset") and isinstance(gt.dataset, Mapping):  # pycocotools COCO
        return gt.dataset  # type: ignore[return-value]
    if isinstance(gt, (str, os.PathLike)):
        # A file from the user: checked, and its problems named (kdrun.data.coco; imported here only, as
        # it brings torch, which the analysis itself does not need).
        from kdrun.data.coco import check_annotations, read_json

        return check_annotations(read_json(gt, "COCO annotation file"), gt)
    if isinstance(gt, Mapping):
        return dict(gt)
    raise TypeError(f"ground truth must be a COCO object, a json path or a dict, not {type(gt).__name__}")


def _load_detections(detections: Any, data: Mapping[str, Any]) -> Sequence[Mapping[str, Any]]:
    """A detections file is parsed and checked (a damaged or foreign one is an error naming it, not a
    traceback or detections silently dropped); a list given in code is used as it is."""
    if not isinstance(detections, (str, os.PathLike)):
        return detections  # type: ignore[no-any-return]
    from kdrun.data.coco import check_detections, read_json

    ids = {im["id"] for im in data.get("images", []) if isinstance(im, Mapping)}
    return check_detections(read_json(detections, "detections file"), detections, ids)


@dataclass
class _Tally:
    """What the per-image matching collects: the detections' PR points per class (pred id → (score, true
    positive)), the ground-truth counts, the false negatives, and every error with what would fix it."""

    points: dict[int, dict[int, tuple[float, bool]]] = field(default_factory=lambda: defaultdict(dict))
    num_gt: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    false_neg: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    errors: list[_Error] = field(default_factory=list)


def tide(gt: Any, detections: Sequence[Mapping[str, Any]] | str | os.PathLike, pos_thresh: float = 0.5,
         bg_thresh: float = 0.1, max_dets: int = 100) -> TideResult:
    """TIDE box-error analysis of COCO-json ``detections`` (list or file) against ``gt`` (COCO object,
    annotation json path or dict). See the module docstring."""
    data = _load_gt(gt)
    detections = _load_detections(detections, data)
    gts: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for a in data.get("annotations", []):
        gts[int(a["image_id"])].append(a)
    preds: dict[int, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for i, d in enumerate(detections):
        preds[int(d["image_id"])].append((i, d))
    tally = _Tally()
    for image in [int(im["id"]) for im in data.get("images", [])]:
        _tally_image(tally, image, gts.get(image, []), preds.get(image, []), pos_thresh, bg_thresh, max_dets)
    return _summarise(tally, pos_thresh, bg_thresh)


def _tally_image(tally: _Tally, image: int, anns: list[dict[str, Any]], preds: list[tuple[int, dict[str, Any]]],
                 pos_thresh: float, bg_thresh: float, max_dets: int) -> None:
    """Match one image's detections to its ground truth (TIDE's greedy, score-ordered matching) and record
    its PR points and errors in ``tally``."""
    truths = [a for a in anns if not a.get("iscrowd", 0)]
    ignore = [a for a in anns if a.get("iscrowd", 0)]
    records = [_GT((image, j), int(a["category_id"])) for j, a in enumerate(truths)]
    for g in records:
        tally.num_gt[g.cls] += 1
    plist = sorted(preds, key=lambda p: -float(p[1]["score"]))[:max_dets]
    if not plist:
        for g in records:
            tally.false_neg[g.cls] += 1
            tally.errors.append(_Error("Miss", g.cls, gt=g))
        return
    pb = np.array([p[1]["bbox"] for p in plist], dtype=np.float64).reshape(-1, 4)
    pc = np.array([int(p[1]["category_id"]) for p in plist])
    gb = np.array([a["bbox"] for a in truths], dtype=np.float64).reshape(-1, 4)
    gc = np.array([g.cls for g in records])
    iou = box_iou_xywh(pb, gb)
    same = pc[:, None] == gc[None, :]
    used = _match(iou * same, records, pos_thresh)
    for region in ignore:  # crowd: unmatched predictions of its class inside it are ignored
        crowd_iou = box_iou_xywh(pb, np.array([region["bbox"]], dtype=np.float64), crowd=True)[:, 0]
        for i in range(len(plist)):
            if used[i] is False and crowd_iou[i] > pos_thresh and pc[i] == int(region["category_id"]):
                used[i] = None
    gt_used = np.array([g.used for g in records], dtype=bool)[None, :]
    ious = (iou, iou * same, iou * ~same, iou * same * gt_used)
    for i, (pid, p) in enumerate(plist):
        score, c = float(p["score"]), int(pc[i])
        if used[i] is not None:
            tally.points[c][pid] = (score, bool(used[i]))
        if used[i] is True:
            continue
        err = _Error("", c, pred_id=pid, score=score, ignored=used[i] is None)
        _classify(err, i, records, ious, pos_thresh, bg_thresh)
        tally.errors.append(err)
    for g in records:
        if not g.used:
            tally.false_neg[g.cls] += 1
            if not g.usable:
                tally.errors.append(_Error("Miss", g.cls, gt=g))


def _match(cls_iou: np.ndarray, records: list[_GT], pos_thresh: float) -> list[bool | None]:
    """Greedy matching in score order: each prediction takes its best same-class ground truth still free
    at IoU ≥ ``pos_thresh``. Returns per prediction True (matched) / False; marks the matched records."""
    used: list[bool | None] = [False] * cls_iou.shape[0]
    if records:
        buffer = cls_iou.copy()
        for i in range(cls_iou.shape[0]):
            j = int(np.argmax(buffer[i]))
            if buffer[i, j] >= pos_thresh:
                used[i] = True
                records[j].used = True
                buffer[:, j] = 0
    return used


def _classify(err: _Error, i: int, records: list[_GT], ious: tuple[np.ndarray, ...], pos_thresh: float,
              bg_thresh: float) -> None:
    """TIDE's error type of the unmatched prediction ``i`` (Loc, Cls, Dupe, Bkg, Both), and its best
    ground truth (TIDE's BestGTMatch: one fix per ground truth, the best-scoring prediction)."""
    iou, cls_iou, noncls_iou, used_cls_iou = ious
    if not records:
        err.kind = "Bkg"
    else:
        j = int(np.argmax(cls_iou[i]))
        if bg_thresh <= cls_iou[i, j] <= pos_thresh:
            err.kind, err.gt = "Loc", records[j]
        else:
            j = int(np.argmax(noncls_iou[i]))
            if noncls_iou[i, j] >= pos_thresh:
                err.kind, err.gt = "Cls", records[j]
            elif used_cls_iou[i].max() >= pos_thresh:
                err.kind = "Dupe"
            elif iou[i].max() <= bg_thresh:
                err.kind = "Bkg"
            else:
                err.kind = "Both"
    if err.gt is not None:
        if err.gt.used:
            err.suppressed = True
        else:
            err.gt.usable = True
            if err.gt.best_score < err.score:
                err.gt.best_score, err.gt.best_id = err.score, err.pred_id


def _mean_ap(pts: Mapping[int, Mapping[int, tuple[float, bool]]], ngt: Mapping[int, int]) -> float:
    keys = [k for k in set(pts) | set(ngt) if len(pts.get(k, {})) or ngt.get(k, 0) != 0]
    if not keys:
        return 0.0
    return float(np.mean([average_precision(list(pts.get(k, {}).values()), ngt.get(k, 0)) for k in keys]))


def _summarise(tally: _Tally, pos_thresh: float, bg_thresh: float) -> TideResult:
    """AP, and for each error type the AP once those errors are fixed (ΔAP), as TIDE reports them."""
    classes = set(tally.num_gt) | set(tally.points)

    def fix(condition: Callable[[_Error], bool], transform: Callable[[float, bool], tuple[float, bool]] | None = None,
            remove_false_negatives: bool = False) -> float:
        ngt = {k: tally.num_gt.get(k, 0) for k in classes}
        new: dict[int, dict[int, tuple[float, bool]]] = defaultdict(dict)
        for e in tally.errors:
            item = e.fixed() if condition(e) else e.original()
            if item is None:
                continue
            c, dp = item
            if isinstance(dp, int):
                ngt[c] = ngt.get(c, 0) + dp
                continue
            new[c][e.pred_id] = transform(*dp) if transform else dp
        for c in classes:  # the true positives stay
            for pid, (score, tp) in tally.points.get(c, {}).items():
                if tp:
                    new[c][pid] = transform(score, tp) if transform else (score, tp)
        if remove_false_negatives:
            for c, n in tally.false_neg.items():
                ngt[c] = ngt.get(c, 0) - n
        return _mean_ap(new, ngt)

    ap = _mean_ap(tally.points, tally.num_gt)
    main = {kind: max(fix(lambda e, k=kind: e.kind == k) - ap, 0.0) for kind in MAIN_ERRORS}
    special = {
        "FalsePos": fix(lambda e: False, transform=lambda s, tp: (1.0, True) if tp else (0.0, False)) - ap,
        "FalseNeg": fix(lambda e: False, remove_false_negatives=True) - ap,
    }
    counts = {kind: sum(e.kind == kind for e in tally.errors) for kind in MAIN_ERRORS}
    return TideResult(ap, main, special, counts, pos_thresh, bg_thresh)


def plot_tide(result: TideResult | Sequence[tuple[str, TideResult]], path: str | os.PathLike,
              title: str = "TIDE error analysis") -> Path:
    """Bar chart (PNG) of the six main errors' ΔAP (and the two special ones) of one or several runs
    (``[(label, result), …]``), as DTO-KD Fig. 4 / MoKD Fig. 5."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    runs = [("", result)] if isinstance(result, TideResult) else list(result)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [3, 1]})
    for ax, names, get in ((axes[0], MAIN_ERRORS, lambda r: r.main_errors),
                           (axes[1], SPECIAL_ERRORS, lambda r: r.special_errors)):
        width = 0.8 / len(runs)
        x = np.arange(len(names))
        for i, (label, r) in enumerate(runs):
            vals = [get(r)[n] for n in names]
            bars = ax.bar(x + (i - (len(runs) - 1) / 2) * width, vals, width,
                          label=f"{label} (AP{int(r.pos_thresh * 100)} {r.ap:.1f})".strip())
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks(x, names)
        ax.set_ylabel("ΔAP (points)")
    axes[0].set_title("main errors")
    axes[1].set_title("special errors")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kdrun.analysis.tide GT.json DETECTIONS.json [--out tide.png]``: print the summary, save the plot."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m kdrun.analysis.tide", description=main.__doc__)
    ap.add_argument("gt")
    ap.add_argument("detections")
    ap.add_argument("--out", default=None, help="PNG path for the bar chart")
    ap.add_argument("--pos-thresh", type=float, default=0.5)
    ap.add_argument("--bg-thresh", type=float, default=0.1)
    args = ap.parse_args(argv)
    try:
        res = tide(args.gt, args.detections, args.pos_thresh, args.bg_thresh)
    except Exception as e:  # a damaged or foreign file: one paragraph, exit 2 (as `kdrun tide`)
        from kdrun.errors import find_user_error, report

        user = find_user_error(e)
        if user is None:
            raise
        report(user)
    print(json.dumps(res.to_dict(), indent=2))
    if args.out:
        print(f"plot: {plot_tide(res, args.out)}")
    return 0


def main_run_dir(argv: Sequence[str]) -> int:
    """``kdrun tide RUN_DIR``: TIDE on the student's saved val detections of a detection run
    (``RUN_DIR/val_detections.json``, written at every evaluation), against the ground truth of the
    run's own val split (rebuilt from ``RUN_DIR/config.yaml`` unless ``--gt`` is given). Prints the six
    dAP values and writes ``RUN_DIR/tide.png``."""
    import argparse

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    ap = argparse.ArgumentParser(prog="kdrun tide", description=main_run_dir.__doc__)
    ap.add_argument("run_dir")
    ap.add_argument("--gt", default=None, help="COCO annotation json (default: the run's val split)")
    ap.add_argument("--detections", default=None, help="default: RUN_DIR/val_detections.json")
    ap.add_argument("--out", default=None, help="bar chart PNG (default: RUN_DIR/tide.png)")
    ap.add_argument("--pos-thresh", type=float, default=0.5)
    ap.add_argument("--bg-thresh", type=float, default=0.1)
    args = ap.parse_args(list(argv))
    run = Path(args.run_dir)
    dets = Path(args.detections) if args.detections else run / "val_detections.json"
    if not dets.is_file():
        raise FileNotFoundError(f"{dets} does not exist: is {run} a detection run (task=detection) that "
                                "has evaluated at least once?")
    gt: Any = args.gt
    if gt is None:
        cfg = OmegaConf.load(run / "config.yaml")
        gt = instantiate(cfg.dataset, _convert_="all").val.coco  # the exact split the run evaluated
    res = tide(gt, dets, args.pos_thresh, args.bg_thresh)
    print(json.dumps(res.to_dict(), indent=2))
    print(f"plot: {plot_tide(res, args.out or run / 'tide.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
