"""`kdrun plot`: on two short digits runs it writes non-empty PNGs, and the data handed to matplotlib is
exactly what the runs logged (compared with TensorBoard's own record, not with pixels)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdrun import plot
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
    for i, d in enumerate(runs):
        tb = event_scalars(d)
        assert conflict.lines[i].x == [float(st) for st, _ in tb["grad/conflict"]]
        assert conflict.lines[i].y == approx([v for _, v in tb["grad/conflict"]])
        assert dominance.lines[i].y == approx([v for _, v in tb["grad/dominance"]])  # all > 0 here
        pi = {line.label: line for line in figs["pi.png"][i].lines}
        assert set(pi) == {"distill", "task"}
        assert pi["task"].y == approx([v for _, v in tb["pi/task"]])
        val = figs["val_top1.png"][0].lines[i]
        assert val.x == [1.0, 2.0] and val.y == approx([v for _, v in tb["val/top1"]])
    # The DTO balancer moves π; the fixed one keeps its weights.
    assert len(set(figs["pi.png"][0].lines[0].y)) > 1 and len(set(figs["pi.png"][1].lines[0].y)) == 1


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
             rows: list[str] | None = None) -> Path:
    import json

    import yaml

    d.mkdir(parents=True)
    cfg = {"seed": seed, "balancer": {"_target_": "kdrun.balancers.fixed.Fixed"}, "distill": {"kl": {}},
           "student": {"model": {"_target_": "kdrun.models.convnet.convnet_s"}},
           "teacher": {"model": {"_target_": "kdrun.models.convnet.convnet_l"}}, "paper": {"row": None}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    if balancer is not None:  # what Hydra records for a CLI run
        choices = {"balancer": balancer, **({"recipe": recipe} if recipe else {})}
        (d / ".hydra").mkdir()
        (d / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}}))
    if rows is None:
        rows = [json.dumps({"kind": "train", "step": s, "grad/conflict": -0.1 * s, "pi/distill": 0.5,
                            "pi/task": 0.5}) for s in (1, 2, 3)]
        rows.append(json.dumps({"kind": "val", "step": 3, "epoch": 1, "val/top1": 50.0}))
    (d / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    return d


def test_legends_name_the_runs_not_the_time_of_day(tmp_path: Path) -> None:
    a = fake_run(tmp_path / "21-04-07", "dto", 0)
    b = fake_run(tmp_path / "21-09-55", "fixed_mean", 0)
    assert plot.run_labels([a, b]) == {a: "dto", b: "fixed_mean"}  # only what differs
    assert plot.common_label([a, b]) == "quickstart seed=0"        # the rest: the figure's title
    assert plot.run_labels([a]) == {a: "quickstart dto seed=0"}    # one run: recipe, balancer, seed
    c = fake_run(tmp_path / "0_dto_seed1", "dto", 1)
    assert plot.run_labels([a, b, c]) == {a: "dto seed=0", b: "fixed_mean seed=0", c: "dto seed=1"}
    # Without Hydra's record (runs made through the Python API): the saved config's facts.
    e = fake_run(tmp_path / "api", None, 2)
    assert plot.run_labels([e]) == {e: "student=convnet_s teacher=convnet_l Fixed distill=kl seed=2"}
    # Identical runs still get distinct labels.
    f = fake_run(tmp_path / "again", "dto", 0)
    labels = plot.run_labels([a, f])
    assert len(set(labels.values())) == 2 and all("dto" in v for v in labels.values())


def test_coinciding_pi_lines_are_drawn_distinguishably(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    figs = plot.figure_data([fake_run(tmp_path / "r", "fixed_mean", 0)])
    (panel,) = figs["pi.png"]
    assert [line.y for line in panel.lines] == [[0.5] * 3, [0.5] * 3]  # the same values ...
    styles = {(line.linestyle, line.linewidth) for line in panel.lines}
    assert len(styles) == 2                                           # ... two different strokes
    fig = plot.draw(panel and [panel])
    try:
        drawn = fig.axes[0].get_lines()
        assert {ln.get_linestyle() for ln in drawn if ln.get_label() in ("distill", "task")} == {"-", "--"}
        assert all(ln.get_marker() == "o" for ln in drawn if ln.get_label() in ("distill", "task"))  # short run
    finally:
        plt.close(fig)
    conflict = figs["gradient_dynamics.png"][0]
    assert "< 0" in conflict.title and conflict.shade_below and conflict.hline == 0.0


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
