"""`kdrun tables`: a mini sweep on digits lands in a tiny table with the right statistics; the real
table definitions render every paper number (and blanks) without runs; the transcribed numbers match the
papers' text."""
from __future__ import annotations

import csv
import io
import json
import re
import statistics
from pathlib import Path

import pytest
import torch
import yaml

from kdrun.analysis import tables
from tests.conftest import QUICK, run

PAPERS = Path(__file__).resolve().parents[2] / "shared" / "papers"

MINI = {
    "tables": {
        "mini": {
            "title": "Mini digits table",
            "metric": "top-1 (%)",
            "columns": [{"id": "digits", "label": "Digits"}, {"id": "avg", "label": "Avg", "aggregate": "mean"}],
            "rows": [{"id": "fixed", "label": "Fixed"}, {"id": "dto", "label": "DTO"},
                     {"id": "famo", "label": "FAMO (no runs)"}, {"id": "ref", "label": "Other", "reference": True}],
            "numbers": [{"row": "fixed", "column": "digits", "value": 90.0, "source": "made up"},
                        {"row": "dto", "column": "digits", "value": 91.5, "source": "made up"},
                        {"row": "ref", "column": "digits", "value": 88.25, "source": "made up"}],
        }
    }
}


@pytest.fixture(scope="module")
def mini_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 balancers x 2 seeds, a few steps each, tagged for the mini table through the `paper` node."""
    root = tmp_path_factory.mktemp("sweep")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches on a shared 2-core box: a 2nd thread only adds contention
    try:
        for balancer in ("fixed", "dto"):
            for seed in (0, 1):
                run(["teacher=convnet_l", "teacher.checkpoint=null", "teacher.allow_random=true", "distill=kl",
                     f"balancer={balancer}", f"seed={seed}", "trainer.epochs=1", "trainer.max_steps=3", "logger.backends=[]",
                     "trainer.save_best=false", "trainer.save_last=false", *QUICK,
                     # ++: works whether or not conf/config.yaml declares `paper: null`
                     "++paper.table=mini", f"++paper.row={balancer}", "++paper.column=digits"],
                    root / f"{balancer}_{seed}")
    finally:
        torch.set_num_threads(threads)
    return root


@pytest.fixture(scope="module")
def mini_defs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("defs") / "mini.yaml"
    path.write_text(yaml.safe_dump(MINI))
    return path


def ci95(values: list[float]) -> tuple[float, float]:
    """The reference 95 % interval of a mean: scipy's one-sample t-test's own confidence interval."""
    from scipy.stats import ttest_1samp

    ci = ttest_1samp(values, 0.0).confidence_interval(0.95)
    return float(ci.low), float(ci.high)


def top1s(root: Path, row: str, metric: str = "final") -> list[float]:
    return [json.loads(p.read_text())[metric]["top1"] for p in sorted(root.glob(f"{row}_*/results.json"))]


def test_mini_sweep_csv_statistics(mini_sweep: Path, mini_defs: Path, capsys: pytest.CaptureFixture) -> None:
    assert tables.main(["--table", "mini", "--definitions", str(mini_defs), "--format", "csv", str(mini_sweep)]) == 0
    rows = {(r["row"], r["column"]): r for r in csv.DictReader(io.StringIO(capsys.readouterr().out))}
    assert len(rows) == 4 * 2  # every cell, blanks included
    means = {}
    for row, paper in (("fixed", 90.0), ("dto", 91.5)):
        vals = top1s(mini_sweep, row)
        assert len(vals) == 2
        r = rows[(row, "digits")]
        assert int(r["n"]) == 2
        assert float(r["kdrun_mean"]) == pytest.approx(statistics.fmean(vals), abs=1e-4)
        assert float(r["kdrun_std"]) == pytest.approx(statistics.stdev(vals), abs=1e-4)
        assert float(r["paper"]) == paper
        assert float(r["delta"]) == pytest.approx(statistics.fmean(vals) - paper, abs=1e-4)
        means[row] = statistics.fmean(vals)
        assert (float(r["ci_low"]), float(r["ci_high"])) == pytest.approx(ci95(vals), abs=1e-4)
        # The aggregate column averages the row's cells (one here); a mean of means has no interval.
        assert float(rows[(row, "avg")]["kdrun_mean"]) == pytest.approx(means[row], abs=1e-4)
        assert rows[(row, "avg")]["ci_low"] == "" and rows[(row, "avg")]["diff_mean"] == ""
    # The mini table has no kd row: no default baseline, no differences.
    assert all(r["baseline"] == "" for r in rows.values())
    blank = rows[("famo", "digits")]
    assert blank["kdrun_mean"] == "" and blank["n"] == "0" and blank["paper"] == ""
    ref = rows[("ref", "digits")]
    assert float(ref["paper"]) == 88.25 and ref["kdrun_mean"] == ""


def test_mini_sweep_markdown_and_best_metric(mini_sweep: Path, mini_defs: Path, capsys: pytest.CaptureFixture) -> None:
    assert tables.main(["--table", "mini", "--definitions", str(mini_defs), "--metric", "best", str(mini_sweep)]) == 0
    out = capsys.readouterr().out
    assert "best top-1" in out  # says which metric
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    assert len(lines) == 1 + 4  # header + every row
    vals = top1s(mini_sweep, "dto", "best")
    mean, sd = statistics.fmean(vals), statistics.stdev(vals)
    dto = next(line for line in lines if line.startswith("| DTO |"))
    lo, hi = ci95(vals)
    assert f"91.50 / {mean:.2f} ± {sd:.2f} (n=2) [{lo:.2f}, {hi:.2f}] / {mean - 91.5:+.2f}" in dto
    famo = next(line for line in lines if line.startswith("| FAMO"))
    assert famo.count("— / — / —") == 2  # no paper number, no runs, no delta; the Avg cell too


def test_latex_renders(mini_sweep: Path, mini_defs: Path, capsys: pytest.CaptureFixture) -> None:
    assert tables.main(["--table", "mini", "--definitions", str(mini_defs), "--format", "latex", str(mini_sweep)]) == 0
    out = capsys.readouterr().out
    assert r"\begin{tabular}{lcc}" in out and out.count(r"\\") == 1 + 4 and "(n=2)" in out


@pytest.mark.parametrize("name", ["imagenet", "cifar100", "cifar100_dynamic", "cifar100_dynamic_mtl", "coco",
                                  "coco_teachers", "coco_ablation_dto_kd", "coco_ablation_mokd"])
def test_real_tables_render_paper_numbers_without_runs(name: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    defs = tables.load_definitions()
    t = defs[name]
    assert tables.main(["--table", name, "--format", "csv", str(tmp_path)]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == len(t.rows) * len(t.columns) * len(t.metrics)
    for r in rows:
        key = (r["row"], r["column"], r["key"])
        assert r["kdrun_mean"] == "" and r["n"] == "0"
        if key in t.numbers:
            assert float(r["paper"]) == t.numbers[key] and r["source"]
        else:
            assert r["paper"] == ""
    assert tables.main(["--table", name, str(tmp_path)]) == 0
    md = capsys.readouterr().out
    for v in t.numbers.values():
        assert f"{v:.2f} / — / —" in md
    body = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| |")]
    # one metric: a line per row; several (COCO): a line per (column, row), the metrics across
    assert len(body) == len(t.rows) * (len(t.columns) if len(t.metrics) > 1 else 1)
    assert tables.main(["--table", name, "--format", "latex", str(tmp_path)]) == 0
    assert capsys.readouterr().out.count(r"\\") == 1 + len(body) + (len(t.columns) if len(t.metrics) > 1 else 0)


def test_headline_numbers() -> None:
    d = tables.load_definitions()
    assert d["imagenet"].paper[("dto_kd", "deit_tiny")] == 79.7
    assert d["imagenet"].paper[("mokd", "deit_small")] == 83.1
    assert d["cifar100"].paper[("dto_kd", "resnet56_resnet20")] == 72.29
    assert d["cifar100"].paper[("mokd", "wrn_40_2_wrn_40_1")] == 75.54  # MoKD's only differing number
    assert d["cifar100_dynamic"].paper[("kd_cross_batch", "avg")] == 76.66
    assert d["cifar100_dynamic_mtl"].paper[("average", "cross_batch")] == 75.40


def test_coco_tables_metrics_layout() -> None:
    d = tables.load_definitions()
    coco, teachers = d["coco"], d["coco_teachers"]
    assert [m.key for m in coco.metrics] == ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    assert all(m.scale == 100 for m in coco.metrics + teachers.metrics)
    assert coco.numbers[("dto_kd", "vidt_nano", "AP")] == 43.7 and coco.paper[("mokd", "vidt_small")] == 49.6
    assert coco.numbers[("teacher", "vidt_tiny", "APl")] == 66.8
    assert teachers.paper[("dto_kd", "vidt_small_vidt_nano")] == 43.2
    # Table 3 and Table 5 print different token-matching numbers for the same (tiny <- base) runs
    assert coco.paper[("token_matching", "vidt_tiny")] == 46.6
    assert teachers.paper[("token_matching", "vidt_base_vidt_tiny")] == 46.5


def _det_results(ap: float, teacher_ap: float = 0.494, apl: float = 0.6,
                 cells: tuple = (("coco", "dto_kd", "vidt_nano"), ("coco_teachers", "dto_kd", "vidt_base_vidt_nano")),
                 seed: int = 0) -> dict:
    """A detection results.json as kdrun.engine writes it: COCOeval's 0..1 values, -1 for an area range
    without ground truth."""
    metrics = {"AP": ap, "AP50": ap + 0.2, "AP75": ap + 0.03, "APs": ap / 2, "APm": ap + 0.02, "APl": apl}
    (t, r, c), *also = cells
    return {"primary_metric": "AP", "final": metrics, "best": {**metrics, "AP": ap + 0.01, "epoch": 3},
            "teacher": {"AP": teacher_ap, "AP50": 0.696, "AP75": 0.534, "APs": 0.316, "APm": 0.524, "APl": 0.668},
            "config": {"seed": seed, "paper": {"table": t, "row": r, "column": c,
                                               "also": [{"table": a, "row": b, "column": x} for a, b, x in also]}}}


def test_coco_tables_from_detection_results(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Two seeds of the nano DTO-KD recipe: mean ± std in the cells, x 100, COCO's -1 skipped, the teacher
    row from the runs' teacher evaluation, the same runs in Table 5's column through `paper.also`."""
    for seed, (ap, apl) in enumerate([(0.430, 0.61), (0.441, -1.0)]):
        d = tmp_path / f"seed{seed}"
        d.mkdir()
        (d / "results.json").write_text(json.dumps(_det_results(ap, apl=apl, seed=seed)))
    # The COCO tables declare seed 0 (single runs): by default the seed-1 run is left out, and said so.
    assert tables.main(["--table", "coco", "--format", "csv", str(tmp_path)]) == 0
    rows = {(r["row"], r["column"], r["key"]): r for r in csv.DictReader(io.StringIO(capsys.readouterr().out))}
    assert int(rows[("dto_kd", "vidt_nano", "AP")]["n"]) == 1 and rows[("dto_kd", "vidt_nano", "AP")]["seeds"] == "0"
    assert float(rows[("dto_kd", "vidt_nano", "AP")]["kdrun_mean"]) == pytest.approx(43.0)
    assert tables.main(["--table", "coco", str(tmp_path)]) == 0
    assert "1 run(s) of other seeds (1) left out" in capsys.readouterr().out
    assert tables.main(["--table", "coco", "--seeds", "0,1", "--format", "csv", str(tmp_path)]) == 0
    rows = {(r["row"], r["column"], r["key"]): r for r in csv.DictReader(io.StringIO(capsys.readouterr().out))}
    ap = rows[("dto_kd", "vidt_nano", "AP")]
    assert int(ap["n"]) == 2 and float(ap["paper"]) == 43.7
    assert float(ap["kdrun_mean"]) == pytest.approx(43.55, abs=1e-4)
    assert float(ap["kdrun_std"]) == pytest.approx(statistics.stdev([43.0, 44.1]), abs=1e-4)
    assert float(ap["delta"]) == pytest.approx(43.55 - 43.7, abs=1e-4)
    assert float(rows[("dto_kd", "vidt_nano", "AP50")]["kdrun_mean"]) == pytest.approx(63.55, abs=1e-4)
    apl = rows[("dto_kd", "vidt_nano", "APl")]  # -1 (no large objects) is missing, not -100
    assert int(apl["n"]) == 1 and float(apl["kdrun_mean"]) == pytest.approx(61.0) and apl["kdrun_std"] == ""
    teacher = rows[("teacher", "vidt_nano", "AP")]
    assert int(teacher["n"]) == 1 and float(teacher["kdrun_mean"]) == pytest.approx(49.4)
    assert rows[("teacher", "vidt_tiny", "AP")]["kdrun_mean"] == ""  # no run of the tiny block
    assert all(r["kdrun_mean"] == "" for k, r in rows.items() if k[:2] not in {("dto_kd", "vidt_nano"),
                                                                             ("teacher", "vidt_nano")})
    # markdown: the paper's layout, block "Swin-nano", six metric columns
    assert tables.main(["--table", "coco", "--seeds", "all", str(tmp_path)]) == 0
    md = capsys.readouterr().out
    line = next(x for x in md.splitlines() if x.startswith("| Swin-nano: DTO-KD |"))
    assert line.count(" / ") == 2 * 6
    lo, hi = ci95([43.0, 44.1])
    assert f"43.70 / 43.55 ± {statistics.stdev([43.0, 44.1]):.2f} (n=2) [{lo:.2f}, {hi:.2f}] / -0.15" in line
    assert "61.90 / 61.00 (n=1) [n/a] / -0.90" in line  # APl of one run: no interval
    assert "x 100" in md and "final" in md
    # --metric best reads the `best` dict (AP of the best epoch)
    assert tables.main(["--table", "coco", "--metric", "best", "--seeds", "all", "--format", "csv", str(tmp_path)]) == 0
    best = {(r["row"], r["column"], r["key"]): r for r in csv.DictReader(io.StringIO(capsys.readouterr().out))}
    assert float(best[("dto_kd", "vidt_nano", "AP")]["kdrun_mean"]) == pytest.approx(44.55, abs=1e-4)
    # Table 5: the same two runs, AP only, through paper.also
    assert tables.main(["--table", "coco_teachers", "--seeds", "all", "--format", "csv", str(tmp_path)]) == 0
    t5 = {(r["row"], r["column"], r["key"]): r for r in csv.DictReader(io.StringIO(capsys.readouterr().out))}
    assert len(t5) == 6 * 4
    cell = t5[("dto_kd", "vidt_base_vidt_nano", "AP")]
    assert int(cell["n"]) == 2 and float(cell["kdrun_mean"]) == pytest.approx(43.55, abs=1e-4)
    assert float(cell["paper"]) == 43.7
    assert float(t5[("teacher", "vidt_base_vidt_nano", "AP")]["kdrun_mean"]) == pytest.approx(49.4)


def test_metrics_definitions_are_checked(tmp_path: Path) -> None:
    bad = {"tables": {"t": {"metrics": [{"key": "AP", "scale": 100}, {"key": "AP50", "scale": 100}],
                            "rows": [{"id": "r"}], "columns": [{"id": "c"}],
                            "numbers": [{"row": "r", "column": "c", "value": [1.0]}]}}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(tables.TableError, match="one per metric"):
        tables.load_definitions(path)
    bad["tables"]["t"]["numbers"] = [{"row": "r", "column": "c", "metric": "APx", "value": 1.0}]
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(tables.TableError, match="unknown metric"):
        tables.load_definitions(path)
    bad["tables"]["t"]["numbers"] = [{"row": "r", "column": "c", "value": [1.0, None]}]
    path.write_text(yaml.safe_dump(bad))
    t = tables.load_definitions(path)["t"]
    assert t.numbers == {("r", "c", "AP"): 1.0} and t.paper == {("r", "c"): 1.0}


def test_teacher_row_from_runs_counts_one_measurement() -> None:
    t = tables.load_definitions()["imagenet"]
    runs = [tables.Run(Path(f"r{i}"), {"final": {"top1": 70.0 + i}, "teacher": {"top1": 82.5},
                                       "config": {"paper": {"table": "imagenet", "row": "kd", "column": "deit_tiny"}}})
            for i in range(3)]
    cells = tables.build_cells(t, runs, "final")
    assert cells[("teacher", "deit_tiny")].mean == 82.5 and cells[("teacher", "deit_tiny")].n == 1
    assert cells[("teacher", "deit_tiny")].ci is None  # one teacher measured again is not a sample of seeds
    assert cells[("kd", "deit_tiny")].mean == pytest.approx(71.0) and cells[("kd", "deit_tiny")].n == 3
    assert cells[("kd", "deit_small")].mean is None
    # a second teacher value (another evaluation): two values, still no interval, and no paired difference
    runs.append(tables.Run(Path("r9"), {"final": {"top1": 70.0}, "teacher": {"top1": 82.7},
                                        "config": runs[0].results["config"]}))
    cells = tables.build_cells(t, runs, "final")
    assert cells[("teacher", "deit_tiny")].n == 2 and cells[("teacher", "deit_tiny")].ci is None
    paired = tables.build_paired(t, runs, "final", None, ("row", "kd"))
    assert paired[("teacher", "deit_tiny")] is None and paired[("kd", "deit_tiny")].baseline


def test_also_cells_and_bad_usage(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = {"paper": {"table": "a", "row": "r", "column": "c", "also": [{"table": "b", "row": "r2", "column": "c2"}]}}
    assert tables.paper_cells(cfg) == [("a", "r", "c"), ("b", "r2", "c2")]
    assert tables.paper_cells({}) == []
    assert tables.main(["--table", "nope", str(tmp_path)]) == 2
    assert tables.main(["--table", "cifar100", str(tmp_path / "missing")]) == 2
    assert "error" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# Transcription: the numbers in kdrun/analysis/paper_numbers.yaml are the papers' (when the texts are at hand).


def _paper(name: str) -> str:
    path = PAPERS / name
    if not path.is_file():
        pytest.skip(f"{path} not available")
    return path.read_text()


def _row(text: str, prefix: str) -> list[float]:
    line = next(line for line in text.splitlines() if line.startswith(prefix))
    return [float(v) for v in re.findall(r"\d+\.\d+", line.split("\t", 1)[1])]


def test_cifar100_numbers_match_dto_kd_table2_and_mokd_c5() -> None:
    t = tables.load_definitions()["cifar100"]
    cols = [c.id for c in t.columns]
    dto = _paper("dto-kd.txt")
    dto = dto[dto.index("Methods\tHomogeneous"):dto.index("Table 2:")]
    labels = {"teacher": "Teacher", "student": "Student", "fitnet": "FitNet", "rkd": "RKD", "pkt": "PKT",
              "kd": "KD (Hinton", "ofd": "OFD", "crd": "CRD", "dist": "DIST", "reviewkd": "ReviewKD (Chen",
              "dkd": "DKD", "reviewkd_pp": "ReviewKD++", "dto_kd": "DTO-KD (ours)"}
    for row, prefix in labels.items():
        assert _row(dto, prefix) == [t.paper[(row, c)] for c in cols], row
    mokd = _paper("mokd.txt")
    mokd = mokd[mokd.index("C.5. CIFAR"):]
    assert _row(mokd, "MoKD (ours)") == [t.paper[("mokd", c)] for c in cols]
    assert _row(mokd, "OFD") == [t.paper[("ofd", c)] for c in cols]


def test_cross_batch_numbers_match_tables_1_and_2() -> None:
    d = tables.load_definitions()
    text = _paper("cross-batch-kd.txt")
    t1 = text[text.index("Table 1: Comparisons"):text.index("3.1 RESULTS")]
    cols = [c.id for c in d["cifar100_dynamic"].columns]
    for m in ("kd", "rkd", "at", "kdsvd", "pkt"):
        assert _row(t1, m.upper() + "\t") == [d["cifar100_dynamic"].paper[(m, c)] for c in cols], m
        assert _row(t1, m.upper() + " + ours") == [d["cifar100_dynamic"].paper[(m + "_cross_batch", c)] for c in cols]
    t2 = text[text.index("Table 2: Comparison"):text.index("For fair evaluation")]
    mtl = d["cifar100_dynamic_mtl"]
    for rid, prefix in (("resnet101_resnet50", "resnet101\tresnet50"), ("resnet56_resnet20", "resnet56\tresnet20"),
                        ("wrn_40_2_wrn_40_1", "wrn-40-2"), ("resnet32x4_resnet8x4", "resnet32x4"), ("average", "average")):
        assert _row(t2, prefix) == [mtl.paper[(rid, c.id)] for c in mtl.columns], rid


def test_imagenet_numbers_match_dto_kd_table1() -> None:
    t = tables.load_definitions()["imagenet"]
    text = _paper("dto-kd.txt")
    text = text[text.index("Method\tVenue\tTop@1"):text.index("Table 1:")]
    tops = [float(line.split("\t")[2]) for line in text.splitlines()[1:] if line.count("\t") >= 3]
    # Paper order: 3 reference models, then the DeiT-Ti block (11 rows), then the DeiT-S block (10 rows).
    ti_rows = ["nokd", "kd", "kd_1000ep", "civt", "manifold", "dearkd", "dearkd_1000ep", "uskd", "maskedkd", "srd",
               "vkd", "dto_kd"]
    s_rows = ["nokd", "kd", "kd_1000ep", "civt", "dearkd", "dearkd_1000ep", "uskd", "maskedkd", "srd", "vkd", "dto_kd"]
    expect = ([t.paper[(r, "deit_tiny")] for r in ("teacher", "cait_s24", "deit3_b")]
              + [t.paper[(r, "deit_tiny")] for r in ti_rows] + [t.paper[(r, "deit_small")] for r in s_rows])
    assert tops == expect


def _after_50(line: str) -> list[float]:
    """The six AP values of a Table 3 / MoKD Table 1 line: the numbers after the Epochs field (50)."""
    fields = [f.strip() for f in line.split("\t")]
    i = fields.index("50")
    return [float(v) for v in fields[i + 1:i + 7]]


@pytest.mark.parametrize("paper, start, stop, own", [("dto-kd.txt", "ViDT Model\t\tEpochs", "Table 3:", "dto_kd"),
                                                     ("mokd.txt", "\tViDT Model\tEpochs", "Table 1.", "mokd")])
def test_coco_numbers_match_dto_kd_table3_and_mokd_table1(paper: str, start: str, stop: str, own: str) -> None:
    t = tables.load_definitions()["coco"]
    text = _paper(paper)
    block = text[text.index(start):text.index(stop, text.index(start))]
    lines = [line for line in block.splitlines()[1:] if "\t50\t" in line]
    assert len(lines) == 13
    order = [("teacher", "vidt_nano")] + [(r, s) for s in ("vidt_nano", "vidt_tiny", "vidt_small")
                                          for r in ("nokd", "token_matching", "vkd", own)]
    for line, (row, col) in zip(lines, order):
        assert _after_50(line) == [t.numbers[(row, col, m.key)] for m in t.metrics], (paper, row, col, line)
    for col in ("vidt_tiny", "vidt_small"):  # one teacher heads every block
        assert [t.numbers[("teacher", col, m.key)] for m in t.metrics] == _after_50(lines[0])


@pytest.mark.parametrize("paper, start, stop, own, skip", [("dto-kd.txt", "Student\tViDT-nano", "Table 5:", "DTO-KD (ours)", 0),
                                                           ("mokd.txt", "Student\t\tViDT-nano", "Table 4.", "MoKD", 1)])
def test_coco_teacher_numbers_match_dto_kd_table5_and_mokd_table4(paper: str, start: str, stop: str, own: str,
                                                                   skip: int) -> None:
    t = tables.load_definitions()["coco_teachers"]
    cols = [c.id for c in t.columns]
    assert cols == ["vidt_small_vidt_nano", "vidt_base_vidt_nano", "vidt_small_vidt_tiny", "vidt_base_vidt_tiny"]
    text = _paper(paper)
    block = text[text.index(start):text.index(stop, text.index(start))]
    labels = {"nokd": "No Distillation", "token_matching": "Token Matching", "vkd": "V", "dto_kd": own, "mokd": own}
    row_ids = ["nokd", "token_matching", "vkd", "dto_kd" if own.startswith("DTO") else "mokd"]
    for row in row_ids:
        line = next(x for x in block.splitlines() if x.startswith(labels[row]) and "\t" in x)
        fields = line.split("\t")[1 + skip:] + [""] * 4
        printed = [float(f) if f.strip() else None for f in fields[:4]]
        mine = [t.paper.get((row, c)) for c in cols]
        if row == "nokd":  # one number per student across its two teacher columns (no teacher)
            assert printed == [mine[0], None, mine[2], None] and mine[1] == mine[0] and mine[3] == mine[2]
        else:
            assert printed == mine, (paper, row, line)


# ---------------------------------------------------------------------------------------------------
# Conventions: best vs final epoch, and the seeds a table counts (issue #11 item 7).


def _cls_run(path: str, seed: int | None, final: float, best: float, cells: list[tuple[str, str, str]]) -> tables.Run:
    (t, r, c), *also = cells
    config: dict = {"paper": {"table": t, "row": r, "column": c,
                              "also": [{"table": a, "row": b, "column": x} for a, b, x in also]}}
    if seed is not None:
        config["seed"] = seed
    return tables.Run(Path(path), {"final": {"top1": final}, "best": {"top1": best, "epoch": 200}, "config": config})


def test_each_table_declares_its_papers_convention() -> None:
    d = tables.load_definitions()
    assert {n: t.convention for n, t in d.items()} == {
        "imagenet": "best", "cifar100": "best", "cifar100_dynamic": "best", "cifar100_dynamic_mtl": "best",
        "coco": "final", "coco_teachers": "final", "coco_ablation_dto_kd": "final", "coco_ablation_mokd": "final"}
    assert all(t.convention_source and t.seeds and t.seeds_source for t in d.values())
    assert "deit" in d["imagenet"].convention_source and "mdistiller" in d["cifar100"].convention_source


def test_default_metric_is_the_convention_and_the_output_says_so() -> None:
    t = tables.load_definitions()["cifar100"]
    runs = [_cls_run(f"r{s}", s, 70.0 + s, 71.0 + s, [("cifar100", "kd", "resnet56_resnet20")]) for s in range(3)]
    default = tables.render(t, runs, fmt="csv")
    row = next(r for r in csv.DictReader(io.StringIO(default)) if r["row"] == "kd" and r["column"] == "resnet56_resnet20")
    assert row["metric"] == "best" and row["convention"] == "best" and float(row["kdrun_mean"]) == pytest.approx(72.0)
    md = tables.render(t, runs)
    assert "kdrun best top-1 (best val epoch), the paper's convention (mdistiller" in md
    override = tables.render(t, runs, metric="final")
    assert "--metric final, NOT the paper's convention: it reports best" in override
    lo, hi = ci95([70.0, 71.0, 72.0])
    assert f"70.66 / 71.00 ± 1.00 (n=3) [{lo:.2f}, {hi:.2f}] / +0.34" in override
    coco = tables.load_definitions()["coco"]
    assert "kdrun final AP" in tables.render(coco, []) and "the paper's convention (ViDT main.py" in tables.render(coco, [])


def test_shared_kd_recipe_counts_each_tables_declared_seeds() -> None:
    """One KD recipe, 5 seeds (reproduce_cifar100_dynamic.sh runs 0-4, reproduce_cifar100.sh 0-2): n = 3 in
    DTO-KD Table 2, n = 5 in the cross-batch tables, and the cifar100 output names the 2 runs it left out."""
    d = tables.load_definitions()
    cells = [("cifar100", "kd", "resnet56_resnet20"), ("cifar100_dynamic", "kd", "resnet56_resnet20"),
             ("cifar100_dynamic_mtl", "resnet56_resnet20", "original")]
    runs = [_cls_run(f"s{s}", s, 70.0, 70.0 + s, cells) for s in range(5)]
    c100 = tables.build_cells(d["cifar100"], tables.select_seeds(d["cifar100"], runs)[0], "best")
    assert c100[("kd", "resnet56_resnet20")].n == 3 and c100[("kd", "resnet56_resnet20")].mean == pytest.approx(71.0)
    dyn = tables.build_cells(d["cifar100_dynamic"], tables.select_seeds(d["cifar100_dynamic"], runs)[0], "best")
    assert dyn[("kd", "resnet56_resnet20")].n == 5 and dyn[("kd", "resnet56_resnet20")].mean == pytest.approx(72.0)
    mtl = tables.build_cells(d["cifar100_dynamic_mtl"], tables.select_seeds(d["cifar100_dynamic_mtl"], runs)[0], "best")
    assert mtl[("resnet56_resnet20", "original")].n == 5
    md = tables.render(d["cifar100"], runs)
    assert "seeds: 0, 1, 2 (declared by this table: kdrun's choice" in md
    assert "2 run(s) of other seeds (3, 4) left out" in md and "3 run(s) matched this table" in md
    assert "(n=5)" in tables.render(d["cifar100"], runs, seeds="all")
    assert "(n=2)" in tables.render(d["cifar100"], runs, seeds=[3, 4])
    assert "seeds: 3, 4 (--seeds)" in tables.render(d["cifar100"], runs, seeds=[3, 4])
    # A run without a seed cannot be shown to be one of the declared seeds: left out, and counted as such.
    kept, left, _ = tables.select_seeds(d["cifar100"], [_cls_run("x", None, 1.0, 1.0, cells)])
    assert kept == [] and len(left) == 1


def test_declared_seeds_are_the_reproduce_scripts_seeds() -> None:
    import runpy

    seeds = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "gen_recipes.py"))["SEEDS"]
    d = tables.load_definitions()
    script_of = {"imagenet": "imagenet", "cifar100": "cifar100", "cifar100_dynamic": "cifar100_dynamic",
                 "cifar100_dynamic_mtl": "cifar100_dynamic", "coco": "coco", "coco_teachers": "coco",
                 "coco_ablation_dto_kd": "coco", "coco_ablation_mokd": "coco"}
    assert set(script_of) == set(d)
    for name, script in script_of.items():
        assert list(d[name].seeds) == seeds[script], name


def test_bad_convention_seeds_and_cli_values(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = {"rows": [{"id": "r"}], "columns": [{"id": "c"}]}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"tables": {"t": {**base, "convention": "mean"}}}))
    with pytest.raises(tables.TableError, match="convention must be one of final, best"):
        tables.load_definitions(path)
    for bad in ([], ["0"], 3, [True]):
        path.write_text(yaml.safe_dump({"tables": {"t": {**base, "seeds": bad}}}))
        with pytest.raises(tables.TableError, match="seeds must be a non-empty list of integers"):
            tables.load_definitions(path)
    assert tables.main(["--table", "cifar100", "--seeds", "a,b", str(tmp_path)]) == 2
    assert "--seeds 'a,b'" in capsys.readouterr().err
    assert tables.parse_seeds("0, 2") == [0, 2] and tables.parse_seeds("all") == "all" and tables.parse_seeds(None) is None


# ---------------------------------------------------------------------------------------------------
# The COCO ablations (issue #11 item 6): DTO-KD Table 4, MoKD Table 3.


def _ablation_lines(text: str, start: str, stop: str) -> list[list[str]]:
    """The data lines of an ablation table: check-mark fields, then AP, AP50, AP75."""
    block = text[text.index(start):text.index(stop, text.index(start))]
    return [line.split("\t") for line in block.splitlines()[1:] if re.search(r"\t\d+\.\d\t\d+\.\d\t\d+\.\d$", line)]


def test_coco_ablation_numbers_match_dto_kd_table4() -> None:
    t = tables.load_definitions()["coco_ablation_dto_kd"]
    assert [m.key for m in t.metrics] == ["AP", "AP50", "AP75"] and [c.id for c in t.columns] == ["vidt_nano"]
    lines = _ablation_lines(_paper("dto-kd.txt"), "Dynamic Trade-off Optimization\t\tS:DTO-KD-nano / T:ViDT-base",
                            "Table 4:")
    assert len(lines) == 5
    # check-mark columns: Proj, Optimization, clipping (the caption's "gradient clipping")
    marks = {"none": ["", "", ""], "clip": ["", "", "✓"], "proj": ["✓", "", ""], "proj_opt": ["✓", "✓", ""],
             "all": ["✓", "✓", "✓"]}
    assert [r.id for r in t.rows] == list(marks)
    for fields, (row, mark) in zip(lines, marks.items()):
        assert [f.strip() for f in fields[:3]] == mark, (row, fields)
        assert [float(v) for v in fields[-3:]] == [t.numbers[(row, "vidt_nano", m.key)] for m in t.metrics], row


def test_coco_ablation_numbers_match_mokd_table3() -> None:
    t = tables.load_definitions()["coco_ablation_mokd"]
    assert [m.key for m in t.metrics] == ["AP", "AP50", "AP75"] and [c.id for c in t.columns] == ["vidt_nano"]
    text = _paper("mokd.txt")
    lines = _ablation_lines(text, "Subspace Learning\tMulti-Task Optimization", "Table 3.")
    assert len(lines) == 4
    assert "MoKD-nano as the student" in text and "ViDT-base as the teacher" in text
    # Subspace Learning, Multi-Task Optimization, High-dimensional Alignment -> the shared row ids
    marks = {"none": ["", "", ""], "proj": ["✓", "", ""], "proj_opt": ["✓", "✓", ""], "all": ["✓", "✓", "✓"]}
    assert [r.id for r in t.rows] == list(marks)
    for fields, (row, mark) in zip(lines, marks.items()):
        assert [f.strip() for f in fields[:3]] == mark, (row, fields)
        assert [float(v) for v in fields[-3:]] == [t.numbers[(row, "vidt_nano", m.key)] for m in t.metrics], row


def test_coco_ablation_tables_from_detection_results(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A run tagged as the recipes tag it lands in its row, three metrics x 100."""
    for table, row in (("coco_ablation_dto_kd", "clip"), ("coco_ablation_mokd", "proj_opt")):
        d = tmp_path / table
        d.mkdir()
        (d / "results.json").write_text(json.dumps(_det_results(0.425, cells=((table, row, "vidt_nano"),))))
        assert tables.main(["--table", table, "--format", "csv", str(d)]) == 0
        rows = {(r["row"], r["key"]): r for r in csv.DictReader(io.StringIO(capsys.readouterr().out))}
        assert float(rows[(row, "AP")]["kdrun_mean"]) == pytest.approx(42.5)
        assert float(rows[(row, "AP50")]["kdrun_mean"]) == pytest.approx(62.5)
        assert rows[(row, "AP")]["metric"] == "final" and int(rows[(row, "AP")]["n"]) == 1
        assert sum(1 for r in rows.values() if r["kdrun_mean"]) == 3


# ---------------------------------------------------------------------------------------------------
# Uncertainty (issue #25 item 6): the 95 % interval of a mean, and paired differences to a baseline by seed.


def test_t_interval_matches_scipy() -> None:
    import numpy as np
    from scipy import stats

    rng = np.random.default_rng(7)
    for n in (2, 3, 5, 10):
        x = list(70 + rng.normal(size=n))
        lo, hi = tables.t_interval(x)
        assert (lo, hi) == pytest.approx(ci95(x), rel=1e-12)
        ref = stats.t.interval(0.95, n - 1, loc=np.mean(x), scale=stats.sem(x))
        assert (lo, hi) == pytest.approx(ref, rel=1e-12)
    assert tables.t_interval([71.5]) is None and tables.t_interval([]) is None  # no spread to estimate
    assert tables.t_interval([99.44] * 3) == (pytest.approx(99.44), pytest.approx(99.44))  # identical values


def test_paired_difference_matches_ttest_rel() -> None:
    import numpy as np
    from scipy import stats

    rng = np.random.default_rng(3)
    base = {s: 70 + rng.normal() for s in range(6)}
    shift = {s: 0.4 + 0.1 * rng.normal() for s in range(6)}
    # The cell ran seeds 1-6 (6 has no baseline run), the baseline 0-5 (0 has no counterpart); a run
    # without a seed pairs with nothing.
    x = [(s, base[s] + shift[s]) for s in range(1, 6)] + [(6, 80.0), (None, 50.0)]
    b = [(s, base[s]) for s in range(6)] + [(None, 10.0)]
    p = tables.paired_difference(x, b)
    xs, bs = [base[s] + shift[s] for s in range(1, 6)], [base[s] for s in range(1, 6)]
    ref = stats.ttest_rel(xs, bs)
    assert p.n == 5 and p.mean == pytest.approx(np.mean(np.subtract(xs, bs)), rel=1e-12)
    assert p.ci == pytest.approx(tuple(ref.confidence_interval(0.95)), rel=1e-12)
    assert p.excludes_zero == (ref.pvalue < 0.05)
    # The same data with a larger spread: the test and the interval change their verdict together.
    noisy = [(s, v + (3.0 if s % 2 else -3.0)) for s, v in x if s is not None]
    q, ref = tables.paired_difference(noisy, b), stats.ttest_rel([v for s, v in noisy if s in range(1, 6)], bs)
    assert q.excludes_zero == (ref.pvalue < 0.05) and q.excludes_zero != p.excludes_zero
    one = tables.paired_difference([(0, 71.0), (1, 72.0)], [(1, 70.0), (2, 69.0)])
    assert (one.mean, one.ci, one.n) == (2.0, None, 1)  # one common seed: a difference, no interval
    none = tables.paired_difference([(0, 71.0)], [(1, 70.0)])
    assert (none.mean, none.ci, none.n) == (None, None, 0)
    same = tables.paired_difference([(s, 99.44) for s in range(3)], [(s, 99.44) for s in range(3)])
    assert same.mean == 0.0 and same.ci == (0.0, 0.0) and not same.excludes_zero


def test_paper_table_paired_differences_to_kd(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    from scipy import stats

    t = tables.load_definitions()["cifar100"]
    col = "resnet56_resnet20"
    kd = {0: 70.1, 1: 70.9, 2: 70.4}
    dto = {0: 70.6, 1: 71.5, 2: 70.7}
    dkd = {0: 71.0, 2: 70.2}  # seed 1 did not finish
    runs = ([_cls_run(f"kd{s}", s, v, v, [("cifar100", "kd", col)]) for s, v in kd.items()]
            + [_cls_run(f"dto{s}", s, v, v, [("cifar100", "dto_kd", col)]) for s, v in dto.items()]
            + [_cls_run(f"dkd{s}", s, v, v, [("cifar100", "dkd", col)]) for s, v in dkd.items()])
    rows = {(r["row"], r["column"]): r for r in csv.DictReader(io.StringIO(tables.render(t, runs, fmt="csv")))}
    d = rows[("dto_kd", col)]
    ref = stats.ttest_rel(list(dto.values()), list(kd.values()))
    assert d["baseline"] == "row KD"  # the default of a paper table: its KD row
    assert float(d["diff_mean"]) == pytest.approx(statistics.fmean(dto.values()) - statistics.fmean(kd.values()),
                                                  abs=1e-4)
    assert (float(d["diff_ci_low"]), float(d["diff_ci_high"])) == pytest.approx(tuple(ref.confidence_interval()),
                                                                                abs=1e-4)
    assert int(d["diff_n"]) == 3
    assert (float(d["ci_low"]), float(d["ci_high"])) == pytest.approx(ci95(list(dto.values())), abs=1e-4)
    k = rows[("dkd", col)]  # paired over seeds 0 and 2 only
    ref = stats.ttest_rel([dkd[0], dkd[2]], [kd[0], kd[2]])
    assert int(k["diff_n"]) == 2 and (float(k["diff_ci_low"]), float(k["diff_ci_high"])) == pytest.approx(
        tuple(ref.confidence_interval()), abs=1e-4)
    assert rows[("kd", col)]["diff_mean"] == "" and rows[("kd", col)]["baseline"]  # the baseline itself
    assert rows[("dto_kd", "wrn_40_2_wrn_40_1")]["diff_mean"] == ""  # no runs there
    md = tables.render(t, runs)
    assert "**Paired difference to row KD" in md and "paired t-test" in md
    lo, hi = ref.confidence_interval()
    assert f"{statistics.fmean([dkd[0] - kd[0], dkd[2] - kd[2]]):+.2f} [{lo:+.2f}, {hi:+.2f}] (n=2)" in md
    # --baseline: another row by label or id; none turns the comparison off; a typo names the choices.
    other = tables.render(t, runs, fmt="csv", baseline="dto_kd")
    assert next(r for r in csv.DictReader(io.StringIO(other)) if r["row"] == "kd" and r["column"] == col)["diff_mean"]
    assert "Paired difference" not in tables.render(t, runs, baseline="none")
    with pytest.raises(tables.TableError, match="--baseline 'kdd': table cifar100 has no such row or column"):
        tables.render(t, runs, baseline="kdd")
    assert tables.main(["--table", "cifar100", "--baseline", "kdd", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    # A table whose columns are the methods: the baseline is a column, differences go along the row.
    mtl = tables.load_definitions()["cifar100_dynamic_mtl"]
    runs = [_cls_run(f"{m}{s}", s, v + s, v + s, [("cifar100_dynamic_mtl", "resnet56_resnet20", m)])
            for m, v in (("original", 70.0), ("cross_batch", 70.5)) for s in range(3)]
    rows = list(csv.DictReader(io.StringIO(tables.render(mtl, runs, fmt="csv", baseline="original"))))
    cb = next(r for r in rows if r["row"] == "resnet56_resnet20" and r["column"] == "cross_batch")
    assert float(cb["diff_mean"]) == pytest.approx(0.5) and float(cb["diff_ci_low"]) == pytest.approx(0.5)
    # no default baseline there (it has no kd row): the table stays as it was
    assert "Paired" not in tables.render(mtl, runs)


def sweep_dirs(root: Path, values: dict[str, dict[int, float]], key: str = "balancer") -> Path:
    """A Hydra multirun directory as `kdrun train -m +recipe=quickstart balancer=a,b seed=0,1,2` leaves it
    (.hydra/overrides.yaml and results.json per job), with the given final top-1 per setting and seed."""
    job = 0
    for setting, by_seed in values.items():
        for seed, top1 in by_seed.items():
            d = root / f"{job}_{setting}_seed{seed}"
            job += 1
            (d / ".hydra").mkdir(parents=True)
            (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["+recipe=quickstart", f"{key}={setting}",
                                                                        f"seed={seed}"]))
            config = {"seed": seed, "balancer": {"_target_": "kdrun.balancers.fixed.Fixed"}}
            (d / "results.json").write_text(json.dumps({"primary_metric": "top1", "config": config,
                                                        "final": {"top1": top1}, "best": {"top1": top1 + 0.5}}))
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def test_sweep_table_rows_by_setting_with_paired_differences(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from scipy import stats

    values = {"fixed_mean": {0: 99.44, 1: 99.16, 2: 99.72}, "dto": {0: 99.72, 1: 99.44, 2: 99.72},
              "mgda": {0: 99.44, 2: 99.72}}  # mgda seed 1 did not finish
    root = sweep_dirs(tmp_path / "sweep", values)
    assert tables.main([str(root), "--format", "csv"]) == 0
    rows = {r["row"]: r for r in csv.DictReader(io.StringIO(capsys.readouterr().out))}
    assert list(rows) == ["balancer=fixed_mean", "balancer=dto", "balancer=mgda"]  # the sweep's order
    for name, by_seed in values.items():
        r = rows[f"balancer={name}"]
        vals = list(by_seed.values())
        assert int(r["n"]) == len(vals) and float(r["kdrun_mean"]) == pytest.approx(statistics.fmean(vals), abs=1e-4)
        assert (float(r["ci_low"]), float(r["ci_high"])) == pytest.approx(ci95(vals), abs=1e-4)
        assert r["metric"] == "final" and r["paper"] == ""
    base = values["fixed_mean"]
    ref = stats.ttest_rel(list(values["dto"].values()), list(base.values()))
    dto = rows["balancer=dto"]
    assert dto["baseline"] == "balancer=fixed_mean" and int(dto["diff_n"]) == 3  # default: the first row
    assert (float(dto["diff_ci_low"]), float(dto["diff_ci_high"])) == pytest.approx(
        tuple(ref.confidence_interval()), abs=1e-4)
    ref = stats.ttest_rel([99.44, 99.72], [base[0], base[2]])
    assert int(rows["balancer=mgda"]["diff_n"]) == 2
    assert float(rows["balancer=mgda"]["diff_ci_low"]) == pytest.approx(ref.confidence_interval().low, abs=1e-4)
    # markdown: one table, the difference beside each row's value; what was swept and shared said above it
    assert tables.main([str(root)]) == 0
    md = capsys.readouterr().out
    assert "**Sweep of balancer: recipe=quickstart**" in md and "final top-1" in md
    assert "| | top-1 (%) | Δ vs balancer=fixed_mean (paired by seed) [95 % CI] |" in md
    lo, hi = ci95(list(values["dto"].values()))
    assert f"| balancer=dto | 99.63 ± 0.16 (n=3) [{lo:.2f}, {hi:.2f}] | +0.19 [" in md
    assert "| balancer=fixed_mean | 99.44 ± 0.28 (n=3)" in md and "| baseline |" in md
    # --baseline by a row's name; --metric best; --by a key (here the seed: a row per seed, nothing to pair)
    assert tables.main([str(root), "--baseline", "balancer=dto", "--metric", "best"]) == 0
    md = capsys.readouterr().out
    assert "Δ vs balancer=dto" in md and "best top-1" in md and "| balancer=dto | 100.13" in md
    # --by a key: the rows by it, the other swept keys across (here a row per seed, a column per balancer)
    assert tables.main([str(root), "--by", "seed", "--format", "csv", "--baseline", "none"]) == 0
    rows = {(r["row"], r["column"]): r for r in csv.DictReader(io.StringIO(capsys.readouterr().out))}
    assert list(rows)[:3] == [("seed=0", f"balancer={b}") for b in ("fixed_mean", "dto", "mgda")]
    assert len(rows) == 9 and rows[("seed=1", "balancer=mgda")]["n"] == "0"
    assert float(rows[("seed=2", "balancer=dto")]["kdrun_mean"]) == pytest.approx(99.72)
    assert tables.main([str(root), "--by", "seed"]) == 0
    md = capsys.readouterr().out
    assert "**Sweep of seed × balancer: recipe=quickstart**" in md and "| | balancer=fixed_mean | balancer=dto |" in md
    assert "**Paired difference to seed=0**" not in md  # a row per seed: nothing shares a seed with seed=0
    # A numeric sweep key is ordered by value; the default baseline is then the smallest.
    num = sweep_dirs(tmp_path / "alpha", {"0.9": {0: 1.0}, "0.1": {0: 2.0}}, key="balancer.alpha_distill")
    assert tables.main([str(num), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["row"] for r in rows] == ["balancer.alpha_distill=0.1", "balancer.alpha_distill=0.9"]
    assert rows[1]["diff_mean"] == "-1.0000" and rows[1]["diff_ci_low"] == ""  # n = 1: no interval


def test_sweep_table_errors_are_one_paragraph(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = sweep_dirs(tmp_path / "sweep", {"fixed": {0: 1.0, 1: 2.0}, "dto": {0: 1.5}})
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [([str(root), "--by", "nope"], "--by nope: no run has that key; the keys that differ between these runs "
                                           "are balancer, seed"),
             ([str(root), "--by", "balancer", "--table", "cifar100"], "--by groups the rows of a sweep's table"),
             ([str(root), "--baseline", "balancer=famo"], "--baseline 'balancer=famo': table sweep has no such row"),
             ([str(empty)], "no usable results.json under"),
             ([str(root), "--by", ","], "--by ',': give comma-separated override keys")]
    for argv, message in cases:
        assert tables.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("kdrun tables: error: ") and message in err and err.count("\n") == 1, err
    # Two runs of one setting with the same seed (a job re-run into the sweep) count once or are an error.
    dup = root / "9_fixed_seed0_again"
    dup.mkdir()
    for f in (".hydra",):
        (dup / f).mkdir()
    (dup / ".hydra" / "overrides.yaml").write_text((root / "0_fixed_seed0" / ".hydra" / "overrides.yaml").read_text())
    (dup / "results.json").write_text((root / "0_fixed_seed0" / "results.json").read_text())
    assert tables.main([str(root)]) == 2
    assert "seed 0 has 2 runs" in capsys.readouterr().err
    assert tables.main([str(root), "--duplicates", "newest"]) == 0
    assert "(n=2)" in capsys.readouterr().out
