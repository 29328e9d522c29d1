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
            run(["teacher=convnet_l", "teacher.checkpoint=null", "distill=kl", f"balancer={balancer}",
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
