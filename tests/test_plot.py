"""`kdrun plot`: on two short digits runs it writes non-empty PNGs, and the data handed to matplotlib is
exactly what the runs logged (compared with TensorBoard's own record, not with pixels)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdrun.analysis import plot
from kdrun.analysis.sweep import SweepError, group_runs
from tests.conftest import QUICK, event_scalars, run


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("plot_runs")
    dirs = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches on a shared 2-core box: a 2nd thread only adds contention
    try:
        for balancer in ("dto", "fixed"):
            d = root / balancer
            # Two epochs (val curve of 2 points), diagnostics every 2nd step (conflict/dominance curves).
            run(["teacher=convnet_l", "teacher.checkpoint=null", "teacher.allow_random=true", "distill=kl",
                 f"balancer={balancer}",
                 "trainer.epochs=2", "trainer.batch_size=128", "logger.log_every=2", "trainer.save_best=false",
                 *QUICK, "logger.grad_stats_every=2"], d)
            dirs.append(d)
    finally:
        torch.set_num_threads(threads)
    return dirs


def approx(values: list[float]) -> object:
    return pytest.approx(values, rel=1e-6, abs=1e-6)  # TensorBoard stores float32


def test_series_equal_tensorboard_scalars(runs: list[Path]) -> None:
    for d in runs:
        s, tb = plot.series(d), event_scalars(d)
        for tag in ("grad/conflict", "grad/dominance", "pi/distill", "pi/task", "val/top1", "loss/ce"):
            steps, values = s[tag]
            assert steps == [st for st, _ in tb[tag]], tag
            assert values == approx([v for _, v in tb[tag]]), tag
        assert s["val/epoch"][1] == [1.0, 2.0]


def test_figure_data_is_the_logged_data(runs: list[Path]) -> None:
    figs = plot.figure_data(runs)
    assert set(figs) == {"gradient_dynamics.png", "pi.png", "val_top1.png"}
    conflict, dominance = figs["gradient_dynamics.png"]
    assert dominance.yscale == "log"
    pi = {p.title.rsplit(" ", 1)[-1]: p for p in figs["pi.png"]}  # a panel per objective
    assert set(pi) == {"distill", "task"}
    for i, d in enumerate(runs):  # one run per balancer: each line is that run's values, without a band
        tb = event_scalars(d)
        assert conflict.lines[i].x == [float(st) for st, _ in tb["grad/conflict"]]
        assert conflict.lines[i].y == approx([v for _, v in tb["grad/conflict"]])
        assert dominance.lines[i].y == approx([v for _, v in tb["grad/dominance"]])  # all > 0 here
        assert pi["task"].lines[i].y == approx([v for _, v in tb["pi/task"]])
        val = figs["val_top1.png"][0].lines[i]
        assert val.x == [1.0, 2.0] and val.y == approx([v for _, v in tb["val/top1"]])
        assert conflict.lines[i].lo is None and val.hi is None
    # The DTO balancer moves π; the fixed one keeps its weights.
    assert len(set(pi["distill"].lines[0].y)) > 1 and len(set(pi["distill"].lines[1].y)) == 1


def test_draw_hands_exactly_that_data_to_matplotlib(runs: list[Path]) -> None:
    import matplotlib.pyplot as plt

    for name, panels in plot.figure_data(runs).items():
        fig = plot.draw(panels)
        try:
            for ax, panel in zip(fig.axes, panels):
                drawn = [line for line in ax.get_lines() if line.get_label() in {p.label for p in panel.lines}]
                assert len(drawn) == len(panel.lines), name
                for line, want in zip(drawn, panel.lines):
                    assert list(line.get_xdata()) == want.x and list(line.get_ydata()) == want.y
                assert ax.get_yscale() == panel.yscale
        finally:
            plt.close(fig)


def test_main_writes_non_empty_pngs(runs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "figs"
    # The runs' parent directory: found recursively, as for a Hydra multirun directory.
    assert plot.main([str(runs[0].parent), "--out", str(out)]) == 0
    written = sorted(p.name for p in out.glob("*.png"))
    assert written == ["gradient_dynamics.png", "pi.png", "val_top1.png"]
    for p in out.glob("*.png"):
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert str(out / "pi.png") in capsys.readouterr().out
    assert plot.main([str(tmp_path / "nothing_here")]) == 2


# ---------------------------------------------------------------------------------------------------
# Legends, styles and damaged logs, on hand-written run directories (no training).


def fake_run(d: Path, balancer: str | None, seed: int, recipe: str | None = "quickstart",
             rows: list[str] | None = None, overrides: list[str] | None = None) -> Path:
    """A run directory as kdrun writes one: config.yaml, metrics.jsonl and, for a CLI run (``balancer``
    given), Hydra's record: the group choices and, when given, the command-line overrides."""
    import json

    import yaml

    d.mkdir(parents=True)
    cfg = {"seed": seed, "balancer": {"_target_": "kdrun.balancers.fixed.Fixed", "alpha_distill": 0.5},
           "distill": {"kl": {}}, "student": {"model": {"_target_": "kdrun.models.convnet.convnet_s"}},
           "teacher": {"model": {"_target_": "kdrun.models.convnet.convnet_l"}}, "paper": {"row": None},
           "trainer": {"seed": None}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    if balancer is not None:  # what Hydra records for a CLI run
        choices = {"balancer": balancer, **({"recipe": recipe} if recipe else {})}
        (d / ".hydra").mkdir()
        (d / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}}))
        if overrides is not None:
            (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if rows is None:
        rows = [json.dumps({"kind": "train", "step": s, "grad/conflict": -0.1 * s, "pi/distill": 0.5,
                            "pi/task": 0.5}) for s in (1, 2, 3)]
        rows.append(json.dumps({"kind": "val", "step": 3, "epoch": 1, "val/top1": 50.0}))
    (d / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    return d


def labels(dirs: list[Path]) -> list[str]:
    return plot.legend_labels(group_runs(dirs))


def test_legends_name_the_runs_not_the_time_of_day(tmp_path: Path) -> None:
    # Without overrides.yaml (older runs): the facts of Hydra's choices and the saved config.
    a = fake_run(tmp_path / "21-04-07", "dto", 0)
    b = fake_run(tmp_path / "21-09-55", "fixed_mean", 0)
    assert labels([a, b]) == ["dto", "fixed_mean"]                         # only what differs
    assert plot.figure_title(group_runs([a, b])) == "quickstart; seed 0"  # the rest: the figure's title
    assert labels([a]) == ["quickstart dto"] and plot.figure_title(group_runs([a])) == "quickstart dto; seed 0"
    c = fake_run(tmp_path / "0_dto_seed1", "dto", 1)
    # dto has seeds 0 and 1, fixed_mean seed 0: each entry says its own seeds.
    assert labels([a, b, c]) == ["dto (seeds 0, 1)", "fixed_mean (seed 0)"]
    # Without Hydra's record (runs made through the Python API): the saved config's facts.
    e = fake_run(tmp_path / "api", None, 2)
    assert labels([e]) == ["student=convnet_s teacher=convnet_l Fixed distill=kl"]
    # Runs with the overrides Hydra saved: the swept override values, key=value.
    sweep = [fake_run(tmp_path / f"sw/{i}_{bal}_seed{s}", bal, s, overrides=["+recipe=quickstart", f"balancer={bal}",
                                                                            f"seed={s}"])
             for i, (bal, s) in enumerate((b, s) for b in ("fixed_mean", "dto") for s in (0, 1))]
    assert labels(sweep) == ["balancer=fixed_mean", "balancer=dto"]
    assert plot.figure_title(group_runs(sweep)) == "recipe=quickstart; lines: mean over seeds 0, 1, bands: min–max"


def test_sweep_groups_by_what_the_overrides_vary(tmp_path: Path) -> None:
    def job(i: int, *overrides: str, balancer: str = "fixed") -> Path:
        seed = next((o.split("=")[1] for o in overrides if o.startswith(("seed=", "trainer.seed="))), "0")
        return fake_run(tmp_path / f"{i}_job", balancer, int(seed), overrides=["+recipe=quickstart", *overrides])

    # 12 jobs: Hydra numbers them in launch order (10 and 11 sort after 9), alphas not in numeric order.
    dirs = [job(i, f"balancer.alpha_distill={a}", f"seed={s}")
            for i, (a, s) in enumerate((a, s) for a in ("0.9", "0.1", "0.5", "0.25") for s in (0, 1, 2))]
    sw = group_runs(dirs[::-1])  # the order given does not matter
    assert [g.label for g in sw.groups] == [f"balancer.alpha_distill={a}" for a in ("0.1", "0.25", "0.5", "0.9")]
    assert sw.keys == ["balancer.alpha_distill"] and sw.replicates == ["seed"]
    assert [g.seeds for g in sw.groups] == [["0", "1", "2"]] * 4
    assert sw.groups[3].runs == dirs[0:3] and sw.shared == [("recipe", "quickstart")]
    # A key one run does not override takes that run's value: Hydra's group choice, else its config's.
    plain = job(20, "seed=0", balancer="fixed_mean")
    dto = job(21, "balancer=dto", "seed=0", balancer="dto")
    assert labels([plain, dto]) == ["balancer=fixed_mean", "balancer=dto"]
    alpha = job(22, "balancer.alpha_distill=0.1", "seed=0")
    assert labels([plain, alpha]) == ["balancer.alpha_distill=0.1", "balancer.alpha_distill=0.5"]  # numeric order
    # trainer.seed is a replicate axis too; everything else that differs is a line.
    tr = [job(30 + s, "distill=kl", f"trainer.seed={s}") for s in (0, 1)] + [job(32, "distill=dkd", "trainer.seed=0")]
    sw = group_runs(tr)
    assert [g.label for g in sw.groups] == ["distill=kl", "distill=dkd"] and sw.replicates == ["trainer.seed"]
    assert [g.seeds for g in sw.groups] == [["0", "1"], ["0"]]
    # --by (what kdrun tables offers): the rows by a chosen key; an unknown key names the ones there are.
    assert [g.label for g in group_runs(dirs, by=["seed"]).groups] == ["seed=0", "seed=1", "seed=2"]
    with pytest.raises(SweepError, match="--by nope: no run has that key; the keys that differ between these "
                                         "runs are balancer.alpha_distill, seed"):
        group_runs(dirs, by=["nope"])


def _metrics(conflict: dict[int, float], dominance: dict[int, float], val: list[float]) -> list[str]:
    import json

    rows = [json.dumps({"kind": "train", "step": s, "grad/conflict": c, "pi/task": 0.5, "pi/distill": 0.5,
                        **({"grad/dominance": dominance[s]} if s in dominance else {})}) for s, c in conflict.items()]
    return rows + [json.dumps({"kind": "val", "step": 10 * e, "epoch": e, "val/top1": v}) for e, v in enumerate(val, 1)]


def test_a_line_is_the_mean_over_seeds_with_a_min_max_band(tmp_path: Path) -> None:
    import numpy as np
    from scipy.stats import gmean

    rng = np.random.default_rng(0)
    conflicts = rng.normal(size=(3, 5))
    dominances = np.exp(rng.normal(size=(3, 5)))
    vals = 90 + rng.normal(size=(3, 2))
    dirs = []
    for s in range(3):
        # seed 2 logged steps 1-3 only (a run cut short): steps 4-5 are the mean of seeds 0 and 1
        steps = range(1, 6) if s < 2 else range(1, 4)
        rows = _metrics({t: float(conflicts[s, t - 1]) for t in steps}, {t: float(dominances[s, t - 1]) for t in steps},
                        list(vals[s]))
        dirs.append(fake_run(tmp_path / f"{s}_dto_seed{s}", "dto", s, rows=rows,
                             overrides=["+recipe=quickstart", "balancer=dto", f"seed={s}"]))
    figs = plot.figure_data(dirs)
    (conflict, dominance), (val,) = figs["gradient_dynamics.png"], figs["val_top1.png"]
    (line,) = conflict.lines
    assert line.label == "recipe=quickstart balancer=dto" and line.x == [1.0, 2.0, 3.0, 4.0, 5.0]
    want = [conflicts[:, t].mean() for t in range(3)] + [conflicts[:2, t].mean() for t in (3, 4)]
    assert line.y == pytest.approx(want, rel=1e-12)
    assert line.lo == pytest.approx([conflicts[:3 if t < 3 else 2, t].min() for t in range(5)], rel=1e-12)
    assert line.hi == pytest.approx([conflicts[:3 if t < 3 else 2, t].max() for t in range(5)], rel=1e-12)
    # dominance is drawn on a log axis: its middle is the geometric mean, the band is still min-max
    (dom,) = dominance.lines
    assert dom.y == pytest.approx([gmean(dominances[:3 if t < 3 else 2, t]) for t in range(5)], rel=1e-12)
    assert dom.lo == pytest.approx([dominances[:3 if t < 3 else 2, t].min() for t in range(5)], rel=1e-12)
    assert "geometric mean" in dominance.title
    assert val.lines[0].x == [1.0, 2.0] and val.lines[0].y == pytest.approx(vals.mean(axis=0), rel=1e-12)
    assert val.lines[0].hi == pytest.approx(vals.max(axis=0), rel=1e-12)


def test_same_values_in_two_settings_stay_visible(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    # fixed and fixed_mean both keep π = 0.5: the two lines coincide.
    dirs = [fake_run(tmp_path / f"{i}_{b}", b, 0, overrides=[f"balancer={b}"])
            for i, b in enumerate(("fixed", "fixed_mean"))]
    figs = plot.figure_data(dirs)
    task = figs["pi.png"][1]
    assert [line.y for line in task.lines] == [[0.5] * 3, [0.5] * 3]             # the same values ...
    strokes = {(line.color, line.linestyle, line.linewidth) for line in task.lines}
    assert len(strokes) == 2 and len({s[1] for s in strokes}) == 2            # ... in two strokes and dashes,
    assert task.lines[0].linewidth > task.lines[1].linewidth                  # the later one thinner, on top
    # and every figure draws a setting in the same stroke
    for panels in figs.values():
        for p in panels:
            assert [(ln.color, ln.linestyle) for ln in p.lines] == [(ln.color, ln.linestyle) for ln in task.lines]
    fig = plot.draw(figs["pi.png"])
    try:
        drawn = [ln for ln in fig.axes[1].get_lines() if ln.get_label() in ("balancer=fixed", "balancer=fixed_mean")]
        assert [ln.get_linestyle() for ln in drawn] == ["-", "--"]
        assert all(ln.get_marker() == "o" for ln in drawn)  # a short run: its points are shown
    finally:
        plt.close(fig)
    conflict = figs["gradient_dynamics.png"][0]
    assert "< 0" in conflict.title and conflict.shade_below and conflict.hline == 0.0


def fake_sweep(root: Path, settings: int, seeds: int, steps: int = 40) -> list[Path]:
    """A sweep of ``settings`` alphas × ``seeds`` seeds with the metrics of a real one: conflicts around 0,
    dominance over two decades, π per objective, five val epochs."""
    import numpy as np

    rng = np.random.default_rng(settings * 100 + seeds)
    dirs = []
    for i in range(settings):
        alpha = f"{(i + 1) / (settings + 1):.3g}"
        for s in range(seeds):
            dom = {t: float(np.exp(rng.normal(np.log(0.3 + 10 * i / settings), 0.3))) for t in range(1, steps + 1)}
            rows = _metrics({t: float(np.exp(-t / 10) - 0.2 + rng.normal(0, 0.1)) for t in range(1, steps + 1)}, dom,
                            [90 + e + i / 10 + float(rng.normal(0, 0.3)) for e in range(5)])
            dirs.append(fake_run(root / f"{len(dirs)}_fixed_seed{s}", "fixed", s, rows=rows, overrides=[
                "+recipe=quickstart", f"balancer.alpha_distill={alpha}", f"seed={s}"]))
    return dirs


def layout_problems(fig: object, title: str) -> list[str]:
    """What makes a drawn figure unreadable: the title or the legend over a panel, panels over each other,
    tick labels of one axis over each other, panels squeezed below 4.5 x 2.5 in of plotting area."""
    from matplotlib.text import Text

    fig.canvas.draw()  # type: ignore[attr-defined]
    r = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    axes = [ax for ax in fig.axes if ax.get_visible()]  # type: ignore[attr-defined]
    boxes = [ax.get_tightbbox(r) for ax in axes]  # the panel with its title, labels and tick labels
    out = []
    (sup,) = [t for t in fig.findobj(Text) if t.get_text().split() == title.split()]  # type: ignore[attr-defined]
    out += [f"title over panel {i}" for i, b in enumerate(boxes) if sup.get_window_extent(r).overlaps(b)]
    for leg in fig.legends:  # type: ignore[attr-defined]
        out += [f"legend over panel {i}" for i, b in enumerate(boxes) if leg.get_window_extent(r).overlaps(b)]
        lb = leg.get_window_extent(r)
        if lb.x0 < 0 or lb.y0 < 0 or lb.x1 > fig.bbox.width or lb.y1 > fig.bbox.height:  # type: ignore[attr-defined]
            out.append("legend outside the figure")
    out += [f"panels {i} and {j} overlap" for i in range(len(boxes)) for j in range(i) if boxes[i].overlaps(boxes[j])]
    for i, ax in enumerate(axes):
        w, h = ax.bbox.width / fig.dpi, ax.bbox.height / fig.dpi  # type: ignore[attr-defined]
        if w < 4.5 or h < 2.5:  # inches: 540 x 300 px of plotting area in the 120-dpi PNG
            out.append(f"panel {i} is {w:.2f} x {h:.2f} in")
        for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            lo, hi = sorted(axis.get_view_interval())
            labels = [t.label1.get_window_extent(r) for t in axis.get_major_ticks() + axis.get_minor_ticks()
                      if t.label1.get_visible() and t.label1.get_text() and lo <= t.get_loc() <= hi]
            out += [f"panel {i}: {name} tick labels collide" for a in range(len(labels)) for b in range(a)
                    if labels[a].overlaps(labels[b])][:1]
    return out


@pytest.mark.parametrize("settings, seeds", [(3, 3), (20, 1), (20, 3), (60, 1)])
def test_figures_stay_readable_for_many_runs(settings: int, seeds: int, tmp_path: Path) -> None:
    """9, 20 and 60 runs (and 60 settings of one run each): every figure keeps its panel size, its title
    and legend off the panels, and tick labels apart; the PNG stays within a screen-sized bound."""
    import matplotlib.pyplot as plt
    from PIL import Image

    dirs = fake_sweep(tmp_path / "sweep", settings, seeds)
    sweep = group_runs(dirs)
    assert len(sweep.groups) == settings
    if settings > 10:  # one key of many settings: said once, as the legend's title; entries are its values
        assert plot.legend_title(sweep) == "balancer.alpha_distill"
        assert plot.legend_labels(sweep)[:2] == [f"{1 / (settings + 1):.3g}", f"{2 / (settings + 1):.3g}"]
    else:
        assert plot.legend_title(sweep) is None and plot.legend_labels(sweep)[0] == "balancer.alpha_distill=0.25"
    title = plot.figure_title(sweep)
    for name, panels in plot.figure_data(dirs, sweep).items():
        fig = plot.draw(panels, title, plot.legend_title(sweep))
        try:
            assert layout_problems(fig, title) == [], name
        finally:
            plt.close(fig)
    out = tmp_path / "figs"
    assert plot.main([str(tmp_path / "sweep"), "--out", str(out)]) == 0
    for png in out.glob("*.png"):
        w, h = Image.open(png).size
        # 2 panels of 648 x 396 px side by side (1 for val top-1), the title, a legend of up to 15 rows
        assert 640 <= w <= 1300 and 480 <= h <= 800, (png.name, w, h)


def test_layout_check_catches_the_old_figures(tmp_path: Path) -> None:
    """The check above fails on what `kdrun plot` drew before (one π panel per run, the title over the first
    panel with tight_layout, every minor tick of a log axis labelled): it can tell a bad figure."""
    import matplotlib.pyplot as plt

    dirs = fake_sweep(tmp_path / "sweep", 3, 3)
    figs = plot.figure_data(dirs)
    fig, axes = plt.subplots(9, 1, figsize=(6.4, 3.8 * 9))
    for ax in axes:
        for line in figs["pi.png"][0].lines:
            ax.plot(line.x, line.y)
    fig.suptitle("recipe=quickstart")
    fig.tight_layout()
    try:
        assert any(p.startswith("title over panel 0") for p in layout_problems(fig, "recipe=quickstart"))
    finally:
        plt.close(fig)
    from matplotlib.ticker import FuncFormatter

    fig = plot.draw(figs["gradient_dynamics.png"], "t")
    try:
        ax = fig.axes[1]
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # the old dominance labels
        assert "panel 1: y tick labels collide" in layout_problems(fig, "t")
    finally:
        plt.close(fig)


def test_damaged_log_is_read_as_far_as_usable(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import json

    good = [json.dumps({"kind": "train", "step": s, "pi/task": 0.4, "pi/distill": 0.6}) for s in (1, 2)]
    bad = ["[1, 2, 3]", json.dumps({"kind": "train", "pi/task": 0.1}), json.dumps({"step": "x"}),
           json.dumps({"step": -1}), '{"kind": "train", "step": 3, "pi/ta']  # truncated by a kill
    d = fake_run(tmp_path / "r", "dto", 0, rows=[*good, *bad])
    with open(d / "metrics.jsonl", "ab") as f:
        f.write(b"\x00\xff\xfe binary \x89PNG\n")
    m = plot.load_metrics(d)
    assert (len(m.rows), m.lines, m.skipped, m.error) == (2, 8, 6, None)
    assert plot.series(d)["pi/task"] == ([1, 2], [0.4, 0.4])
    out = tmp_path / "figs"
    assert plot.main([str(d), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "skipped 6 of 8 lines" in err and "Traceback" not in err
    assert (out / "pi.png").is_file()


def test_nothing_usable_is_one_paragraph_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "metrics.jsonl").write_bytes(bytes(range(256)) * 8)
    unreadable = tmp_path / "unreadable"
    (unreadable / "metrics.jsonl").mkdir(parents=True)  # a directory where the log should be
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("\n\n")
    for d in (binary, unreadable, empty):
        assert plot.main([str(d), "--out", str(tmp_path / "figs")]) == 2, d
        err = capsys.readouterr().err
        assert "kdrun plot: error:" in err and "Traceback" not in err, err
    assert plot.main([str(binary), str(unreadable), str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.count("kdrun plot: warning:") == 3 and "none of the 3 metrics.jsonl" in err
    assert "all 9 lines are not a JSON object" in err
    assert not (tmp_path / "figs").exists()


def test_figures_ignore_styles_set_globally_by_other_libraries(tmp_path: Path) -> None:
    """tidecv's TIDE() calls seaborn's set() for the whole process (larger fonts): kdrun's figures are drawn
    with matplotlib's defaults all the same, so their tick labels still keep apart."""
    import matplotlib
    import matplotlib.pyplot as plt

    seaborn = pytest.importorskip("seaborn")  # a dependency of tidecv, in the dev extra
    dirs = fake_sweep(tmp_path / "sweep", 20, 3)
    sweep = group_runs(dirs)
    with matplotlib.rc_context():  # what seaborn sets is undone after the test
        seaborn.set(style="whitegrid")
        assert matplotlib.rcParams["font.size"] == 12.0
        for name, panels in plot.figure_data(dirs, sweep).items():
            fig = plot.draw(panels, plot.figure_title(sweep), plot.legend_title(sweep))
            try:
                assert layout_problems(fig, plot.figure_title(sweep)) == [], name
            finally:
                plt.close(fig)
