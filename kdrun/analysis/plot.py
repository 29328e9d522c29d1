"""``kdrun plot``: the papers' diagnostic figures from runs' ``metrics.jsonl``.

    kdrun plot RUN_DIR... [--out DIR]

Writes PNGs:

* ``gradient_dynamics.png`` — DTO-KD Fig. 1 / MoKD Fig. 3: the conflict score ⟨g_distill, g_task⟩
  (``grad/conflict``) over iterations and the dominance ‖g_distill‖/‖g_task‖ (``grad/dominance``) on a
  log scale;
* ``pi.png`` — DTO-KD Fig. 3 / MoKD App. C.3: the balancer's weight π (``pi/<name>``) over training, one
  panel per objective;
* ``val_top1.png`` — val top-1 per epoch (``val/top1``).

A RUN_DIR without ``metrics.jsonl`` is searched recursively (a Hydra multirun directory plots all its
jobs). Runs are grouped by what was swept (:func:`kdrun.analysis.sweep.group_runs`: the override keys whose values
differ between the runs; seeds are the replicates): every figure draws one line per setting, the mean over
its seeds (geometric on the dominance's log axis) with a min–max band, in the same colour and dash in
every figure. Legends name the swept values (``balancer=dto``, ``balancer.alpha_distill=0.1``), never
directory names; what all runs share and the seeds are the title. Panels keep one size and the legend sits
below them, so a figure of 60 runs is as readable as one of 9.

The figures are described by :func:`figure_data`, a pure function of the logged scalars (:func:`series`),
and only :func:`draw` touches matplotlib, so the tests check exactly what is plotted. A damaged log
(truncated by a kill, binary, lines of another format) is read as far as it is usable, with a warning
saying how many lines were skipped; with nothing usable the command prints one paragraph and exits 2.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdrun.analysis.sweep import Sweep, order_key, group_runs

Series = tuple[list[int], list[float]]


# ---------------------------------------------------------------------------------------------------
# Reading the logs.


@dataclass
class MetricsFile:
    """What could be read of a run's ``metrics.jsonl``."""

    rows: list[dict[str, Any]]
    lines: int = 0          # non-empty lines
    skipped: int = 0        # lines that are not a JSON object with a step (truncated, binary, foreign)
    error: str | None = None  # the file could not be read at all


def _is_step(v: Any) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool) and v >= 0) or \
        (isinstance(v, float) and v.is_integer() and v >= 0)


def load_metrics(run_dir: str | Path) -> MetricsFile:
    """The rows of ``run_dir/metrics.jsonl`` that are JSON objects with a non-negative integer ``step``.

    Anything else is skipped and counted rather than raised: a run killed mid-write leaves a truncated last
    line, and a plot of a partly damaged log is more use than a traceback. Non-finite values come back as
    floats (the logger writes nan/inf as strings)."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        data = path.read_bytes()
    except OSError as e:
        return MetricsFile([], error=f"cannot read {path}: {e.strerror or e}")
    out = MetricsFile([])
    for raw in data.split(b"\n"):
        raw = raw.strip()
        if not raw:
            continue
        out.lines += 1
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):  # binary or truncated
            row = None
        if isinstance(row, dict) and _is_step(row.get("step")):
            out.rows.append(row)
        else:
            out.skipped += 1
    return out


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The usable rows of ``run_dir/metrics.jsonl`` (see :func:`load_metrics`)."""
    return load_metrics(run_dir).rows


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):  # the logger writes nan/inf as strings
        try:
            return float(v)
        except ValueError:
            return None
    return None


def series(run_dir: str | Path) -> dict[str, Series]:
    """Every logged scalar of a run as ``{tag: (steps, values)}``, in logging order.

    Tags are those of TensorBoard (``grad/conflict``, ``pi/task``, ``val/top1``, ...); the val rows'
    ``epoch`` is available as the tag ``val/epoch`` so val curves can be drawn per epoch. A resumed run
    may log a step twice; the later value wins (what TensorBoard shows after its purge)."""
    out: dict[str, dict[int, float]] = {}
    for row in read_metrics(run_dir):
        step = int(row["step"])
        for k, v in row.items():
            if k in ("kind", "step"):
                continue
            x = _number(v)
            if x is None:
                continue
            tag = "val/epoch" if (k == "epoch" and row.get("kind") == "val") else k
            out.setdefault(tag, {})[step] = x
    return {tag: (sorted(d), [d[s] for s in sorted(d)]) for tag, d in out.items()}


def find_run_dirs(paths: list[str | Path]) -> list[Path]:
    """Run directories (holding metrics.jsonl) named or found under ``paths``, each once, in order."""
    out: list[Path] = []
    for p in map(Path, paths):
        found = [p] if (p / "metrics.jsonl").is_file() else sorted(m.parent for m in p.rglob("metrics.jsonl"))
        out += [d for d in found if d not in out]
    return out


def _seeds_text(seeds: list[str]) -> str:
    """``seed 0``, ``seeds 0, 1, 2``, or ``3 runs`` when they have no seed."""
    real = sorted((s for s in seeds if s), key=order_key)
    if len(real) < len(seeds):
        return f"{len(seeds)} run{'s' if len(seeds) > 1 else ''}"
    return f"seed {real[0]}" if len(real) == 1 else f"seeds {', '.join(real)}"


# More settings than this of one swept key: the legend says the key once, as its title, and each entry
# its value (60 entries of ``balancer.alpha_distill=0.1`` would need a legend taller than the panels).
SHORT_LEGEND_AFTER = 10


def legend_title(sweep: Sweep) -> str | None:
    """The key of a one-key sweep of many settings (its entries are then the values alone), else None."""
    return sweep.keys[0] if len(sweep.keys) == 1 and len(sweep.groups) > SHORT_LEGEND_AFTER else None


def legend_labels(sweep: Sweep) -> list[str]:
    """One legend entry per group: the swept values (``balancer=dto``), never a directory name. When the
    groups' seeds differ, each entry says its own (the title cannot)."""
    same = len({tuple(g.seeds) for g in sweep.groups}) == 1
    short = legend_title(sweep) is not None
    out = []
    for g in sweep.groups:
        label = g.setting[0][1] if short else g.label
        out.append(label if same else f"{label} ({_seeds_text(g.seeds)})")
    return out


def figure_title(sweep: Sweep) -> str:
    """What all runs share, and how their seeds are drawn: ``recipe=quickstart; lines: mean over seeds 0,
    1, 2, bands: min-max``."""
    parts = [sweep.shared_label] if sweep.shared_label else []
    if len({tuple(g.seeds) for g in sweep.groups}) == 1:
        seeds = sweep.groups[0].seeds
        many = len(seeds) > 1
        parts.append(f"lines: mean over {_seeds_text(seeds)}, bands: min–max" if many else _seeds_text(seeds))
    elif any(len(g.runs) > 1 for g in sweep.groups):
        parts.append("lines: mean over each setting's seeds, bands: min–max")
    return "; ".join(p for p in parts if p)


# ---------------------------------------------------------------------------------------------------
# What is drawn (pure).


@dataclass
class Line2D:
    label: str
    x: list[float]
    y: list[float]            # a group's mean over its runs (one run: its values)
    lo: list[float] | None = None  # the band: min and max over the runs at each x (None: one run only)
    hi: list[float] | None = None
    color: str | None = None
    linestyle: str = "-"
    linewidth: float = 1.5


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str
    lines: list[Line2D] = field(default_factory=list)
    yscale: str = "linear"
    hline: float | None = None  # a reference line (0 for the conflict score, 1 for dominance)
    shade_below: str | None = None  # label of the region under `hline` (the conflict side)


def _finite(xs: list[int] | list[float], ys: list[float], positive: bool = False) -> tuple[list[float], list[float]]:
    # Non-finite points cannot be drawn; on a log axis neither can values <= 0.
    keep = [(float(x), y) for x, y in zip(xs, ys) if math.isfinite(y) and (y > 0 or not positive)]
    return [x for x, _ in keep], [y for _, y in keep]


def aggregate(curves: list[tuple[list[float], list[float]]], geometric: bool = False
              ) -> tuple[list[float], list[float], list[float] | None, list[float] | None]:
    """``(x, mean, lo, hi)`` of several runs' curves: at every x that any run logged, the mean over the runs
    that logged it (geometric for a log-scale quantity: the middle of the band on that axis) and the
    min/max band. One curve comes back as it is, without a band."""
    curves = [c for c in curves if c[0]]
    if not curves:
        return [], [], None, None
    if len(curves) == 1:
        return list(curves[0][0]), list(curves[0][1]), None, None
    at: dict[float, list[float]] = {}
    for xs, ys in curves:
        for x, y in zip(xs, ys):
            at.setdefault(x, []).append(y)
    xs = sorted(at)
    if geometric:
        mean = [math.exp(statistics.fmean(math.log(v) for v in at[x])) for x in xs]
    else:
        mean = [statistics.fmean(at[x]) for x in xs]
    return xs, mean, [min(at[x]) for x in xs], [max(at[x]) for x in xs]


# A group's stroke: ten colours, and a dash pattern that changes with the colour cycle (20 distinct
# strokes); the dashed ones are drawn thinner, so lines that coincide (fixed weights 0.5/0.5 in two
# settings) stay visible one over the other.
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf"]
DASHES = [("-", 2.4), ("--", 1.9), ("-.", 1.6), (":", 1.6)]


def group_style(i: int) -> tuple[str, str, float]:
    """(colour, linestyle, linewidth) of the i-th group, the same in every figure."""
    dash, width = DASHES[i % len(DASHES)]
    return COLORS[i % len(COLORS)], dash, width


def figure_data(run_dirs: list[Path], sweep: Sweep | None = None) -> dict[str, list[Panel]]:
    """``{png name: panels}`` for the runs, one line per group of :func:`kdrun.analysis.sweep.group_runs` (the mean
    over its seeds, with a min–max band); a figure without any data is left out."""
    sweep = sweep or group_runs(run_dirs)
    data = {d: series(d) for g in sweep.groups for d in g.runs}
    labels = legend_labels(sweep)
    replicated = any(len(g.runs) > 1 for g in sweep.groups)
    conflict = Panel("Gradient conflict ⟨g_distill, g_task⟩ (< 0: the objectives conflict)", "iteration",
                     "conflict score", hline=0.0, shade_below="conflict (< 0)")
    dominance = Panel("Gradient dominance ‖g_distill‖ / ‖g_task‖ (> 1: distillation dominates)"
                      + ("; lines: geometric mean" if replicated else ""), "iteration",
                      "dominance (log scale)", yscale="log", hline=1.0)
    val = Panel("Validation top-1", "epoch", "val top-1 (%)")
    objectives = sorted({t.removeprefix("pi/") for s in data.values() for t in s if t.startswith("pi/")})
    pis = {o: Panel(f"Objective weight π of {o}", "iteration", f"π ({o})") for o in objectives}

    def val_curve(s: dict[str, Series]) -> tuple[list[float], list[float]]:
        steps, top1 = s["val/top1"]
        epoch = dict(zip(*s.get("val/epoch", ([], []))))
        # Epochs from the val rows; a log without them (older runs) falls back to 1, 2, ...
        return _finite([epoch.get(st, float(i + 1)) for i, st in enumerate(steps)], list(top1))

    def add(panel: Panel, i: int, curves: list[tuple[list[float], list[float]]], geometric: bool = False) -> None:
        x, y, lo, hi = aggregate(curves, geometric)
        if x:  # a group whose values were all non-finite draws nothing
            color, dash, width = group_style(i)
            panel.lines.append(Line2D(labels[i], x, y, lo, hi, color, dash, width))

    for i, g in enumerate(sweep.groups):
        runs = [data[d] for d in g.runs]
        add(conflict, i, [_finite(*s["grad/conflict"]) for s in runs if "grad/conflict" in s])
        add(dominance, i, [_finite(*s["grad/dominance"], positive=True) for s in runs if "grad/dominance" in s],
            geometric=True)
        add(val, i, [val_curve(s) for s in runs if "val/top1" in s])
        for o, panel in pis.items():
            add(panel, i, [_finite(*s[f"pi/{o}"]) for s in runs if f"pi/{o}" in s])
    out = {}
    if conflict.lines or dominance.lines:
        out["gradient_dynamics.png"] = [p for p in (conflict, dominance) if p.lines]
    if any(p.lines for p in pis.values()):
        out["pi.png"] = [p for p in pis.values() if p.lines]
    if val.lines:
        out["val_top1.png"] = [val]
    return out


# ---------------------------------------------------------------------------------------------------
# Drawing.

# Every panel gets the same size whatever the number of runs: runs become lines (grouped by setting),
# never panels, and the one legend goes below the panels, growing by a row per few settings.
PANEL_SIZE = (5.4, 3.3)  # inches
DPI = 120
LEGEND_FONT = 8.0


def _wrap(text: str, width_in: float, fontsize: float) -> str:
    """``text`` wrapped to the width it is drawn in (~0.55 em per character in DejaVu Sans), breaking at
    its "; " clauses first so that a clause stays on one line where it can."""
    chars = max(20, int(width_in * 72 / (fontsize * 0.55)))
    if len(text) <= chars:
        return text
    lines: list[str] = []
    for clause in text.split("; "):
        if lines and len(lines[-1]) + 2 + len(clause) <= chars:
            lines[-1] += "; " + clause
        else:
            if lines:
                lines[-1] += ";"
            lines += textwrap.wrap(clause, chars) or [""]
    return "\n".join(lines)


def _legend_shape(labels: list[str], width_in: float) -> tuple[int, int]:
    """(columns, rows) of the legend: as many columns of the longest label as fit the figure's width."""
    if not labels:
        return 1, 0
    col_in = 0.65 + max(map(len, labels)) * LEGEND_FONT * 0.55 / 72  # the handle and padding, then text
    cols = max(1, min(len(labels), int(width_in // col_in)))
    return cols, math.ceil(len(labels) / cols)


def draw(panels: list[Panel], title: str | None = None, legend_title: str | None = None) -> Any:
    """A matplotlib Figure: the panels in a grid of fixed-size axes, the title above them (constrained
    layout keeps it clear of the first panel) and one legend for all the panels below them (Agg backend:
    no display needed). Drawn with matplotlib's own defaults, whatever was set globally before: tidecv's
    ``TIDE()`` calls seaborn's ``set()``, whose larger fonts made the log axis' tick labels collide."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.style.context("default"):
        fig = _draw(panels, title, legend_title)
        fig.canvas.draw()  # ticks and labels are made now, under these settings (later ones copy them)
    return fig


def _draw(panels: list[Panel], title: str | None, legend_title: str | None) -> Any:
    import matplotlib
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogFormatter, MaxNLocator

    class PlainLogFormatter(LogFormatter):
        # LogFormatter's choice of which ticks to label (every minor tick only on a short range, so the
        # labels never collide), written as plain numbers (0.5, 2, 30) rather than 3×10⁰.
        def __call__(self, x: float, pos: int | None = None) -> str:
            return f"{x:g}" if super().__call__(x, pos) else ""

    ncols = 2 if len(panels) == 4 else min(len(panels), 3)
    nrows = math.ceil(len(panels) / ncols)
    width = PANEL_SIZE[0] * ncols
    entries: dict[str, Line2D] = {}
    for p in panels:
        for line in p.lines:
            entries.setdefault(line.label, line)
    lcols, lrows = _legend_shape(list(entries), width)
    lrows += 1 if legend_title and lrows else 0
    title = _wrap(title or "", width, 11)
    legend_h = 0.3 + 0.2 * lrows if lrows else 0.0
    height = PANEL_SIZE[1] * nrows + legend_h + (0.25 * (title.count("\n") + 1) if title else 0.0)
    fig = plt.figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, p in zip(axes.flat, panels):
        for line in p.lines:
            few = len(line.x) < 30  # a short run: show the points themselves
            ax.plot(line.x, line.y, label=line.label, color=line.color, linewidth=line.linewidth,
                    linestyle=line.linestyle, marker="o" if few else None, markersize=3 if few else None)
            if line.lo is not None and line.hi is not None:
                ax.fill_between(line.x, line.lo, line.hi, color=line.color, alpha=0.15, linewidth=0)
        if p.hline is not None:
            ax.axhline(p.hline, color="0.6", linewidth=0.8, linestyle="--")
        ax.set_yscale(p.yscale)
        if p.yscale == "log":
            ax.yaxis.set_major_formatter(PlainLogFormatter(labelOnlyBase=False))
            ax.yaxis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        if p.shade_below is not None and p.hline is not None:
            lo, hi = ax.get_ylim()
            if lo < p.hline:  # shade and name the conflict side when the data reach it
                ax.axhspan(lo, p.hline, color="tab:red", alpha=0.07, linewidth=0)
                ax.text(0.01, 0.02, p.shade_below, transform=ax.transAxes, fontsize=7, color="tab:red",
                        va="bottom", ha="left")
            ax.set_ylim(lo, hi)
        # Iterations and epochs are counts: integer ticks (a 2-epoch run otherwise gets 1.0, 1.2, ... 2.0).
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(_wrap(p.title, PANEL_SIZE[0], 9.5), fontsize=9.5)
        ax.set_xlabel(p.xlabel)
        ax.set_ylabel(p.ylabel)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=11)
    if entries:
        handles = [matplotlib.lines.Line2D([], [], color=e.color, linestyle=e.linestyle, linewidth=e.linewidth)
                   for e in entries.values()]
        fig.legend(handles, list(entries), loc="outside lower center", ncol=lcols, fontsize=LEGEND_FONT,
                   frameon=False, title=legend_title, title_fontsize=LEGEND_FONT + 1)
    return fig


def write_figures(run_dirs: list[Path], out_dir: Path) -> list[Path]:
    """Draw every figure of :func:`figure_data` into ``out_dir``; returns the PNG paths."""
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    sweep = group_runs(run_dirs)
    title = figure_title(sweep)
    written = []
    for name, panels in figure_data(run_dirs, sweep).items():
        fig = draw(panels, title, legend_title(sweep))
        path = out_dir / name
        fig.savefig(path, dpi=DPI)
        plt.close(fig)
        written.append(path)
    return written


def usable_runs(run_dirs: list[Path]) -> tuple[list[Path], list[str]]:
    """The runs with at least one usable metrics row, and a warning per damaged or unreadable log."""
    ok, notes = [], []
    for d in run_dirs:
        m = load_metrics(d)
        path = d / "metrics.jsonl"
        if m.error:
            notes.append(f"{m.error}; run skipped")
            continue
        what = "not a JSON object with a step (truncated, binary or not written by kdrun)"
        if not m.rows:
            notes.append(f"{path}: no usable row (" + (f"all {m.lines} lines are {what}" if m.lines else "empty")
                         + "); run skipped")
            continue
        if m.skipped:
            notes.append(f"{path}: skipped {m.skipped} of {m.lines} lines that are {what}")
        ok.append(d)
    return ok, notes


def main(argv: list[str] | None = None) -> int:
    """``kdrun plot``; returns the exit status (0 ok, 2 nothing to plot)."""
    p = argparse.ArgumentParser(prog="kdrun plot", description="PNG figures from runs' metrics.jsonl: gradient "
                                "conflict/dominance (DTO-KD Fig. 1), π per objective (Fig. 3), val top-1.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (or directories holding runs)")
    p.add_argument("--out", default=None, help="output directory (default: RUN_DIR/plots for one run, "
                   "./kdrun_plots for several)")
    a = p.parse_args(argv)
    found = find_run_dirs(a.runs)
    if not found:
        print(f"kdrun plot: error: no metrics.jsonl under {', '.join(a.runs)}", file=sys.stderr)
        return 2
    dirs, notes = usable_runs(found)
    for note in notes:
        print(f"kdrun plot: warning: {note}", file=sys.stderr)
    if not dirs:
        print(f"kdrun plot: error: none of the {len(found)} metrics.jsonl file(s) found has a usable row "
              "(see the warnings above); nothing to plot.", file=sys.stderr)
        return 2
    out = Path(a.out) if a.out else (dirs[0] / "plots" if len(dirs) == 1 else Path("kdrun_plots"))
    try:
        written = write_figures(dirs, out)
    except OSError as e:
        print(f"kdrun plot: error: cannot write the figures to {out} ({e.strerror or e}); pass --out DIR.",
              file=sys.stderr)
        return 2
    if not written:
        print("kdrun plot: error: the runs logged none of grad/conflict, grad/dominance, pi/*, val/top1",
              file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
