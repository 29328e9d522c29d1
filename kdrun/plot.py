"""``kdrun plot``: the papers' diagnostic figures from runs' ``metrics.jsonl``.

    kdrun plot RUN_DIR... [--out DIR]

Writes PNGs:

* ``gradient_dynamics.png`` — DTO-KD Fig. 1 / MoKD Fig. 3: the conflict score ⟨g_distill, g_task⟩
  (``grad/conflict``) over iterations and the dominance ‖g_distill‖/‖g_task‖ (``grad/dominance``) on a
  log scale, one line per run;
* ``pi.png`` — DTO-KD Fig. 3 / MoKD App. C.3: the balancer's weight π of every objective (``pi/<name>``)
  over training, one panel per run;
* ``val_top1.png`` — val top-1 per epoch (``val/top1``), the runs overlaid.

A RUN_DIR without ``metrics.jsonl`` is searched recursively (a Hydra multirun directory plots all its
jobs). The figures are described by :func:`figure_data`, a pure function of the logged scalars
(:func:`series`), and only :func:`draw` touches matplotlib, so the tests check exactly what is plotted.

Legends name runs by their recipe, balancer and seed (Hydra's recorded choices, else the saved config),
only the facts that differ between the plotted runs; what they share is the figure's title. A damaged
log (truncated by a kill, binary, lines of another format) is read as far as it is usable, with a warning
saying how many lines were skipped; with nothing usable the command prints one paragraph and exits 2.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def _load(path: Path) -> Any:
    """A YAML/JSON file's content, or None when it is missing or unreadable."""
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None


def _node(d: Any, *keys: str) -> Any:
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d


FACT_KEYS = ("recipe", "balancer", "distill", "student", "teacher", "row", "column", "seed")


def _facts(run_dir: Path) -> dict[str, str]:
    """What tells runs apart: the recipe and balancer options Hydra recorded (``.hydra/hydra.yaml``,
    runtime.choices), else what the engine's saved config (``config.yaml``, or results.json's copy) says:
    the balancer's class, distill terms, models, paper cell and seed."""
    cfg = _load(run_dir / "config.yaml")
    if not isinstance(cfg, dict):
        cfg = _node(_load(run_dir / "results.json"), "config")
    cfg = cfg if isinstance(cfg, dict) else {}
    choices = _node(_load(run_dir / ".hydra" / "hydra.yaml"), "hydra", "runtime", "choices") or {}

    def model(role: str) -> str:
        node = _node(cfg, role, "model") or {}
        return str(node.get("model_name") or str(node.get("_target_", "")).rsplit(".", 1)[-1])

    out: dict[str, str] = {}
    if choices.get("recipe"):
        out["recipe"] = str(choices["recipe"])
    balancer = choices.get("balancer")
    if not balancer and isinstance(cfg.get("balancer"), dict):
        b = cfg["balancer"]
        balancer = str(b.get("_target_", "")).rsplit(".", 1)[-1] + (f"({b['mode']})" if b.get("mode") else "")
    if balancer:
        out["balancer"] = str(balancer)
    if cfg:
        distill = cfg.get("distill")
        out["distill"] = "+".join(distill) if isinstance(distill, dict) and distill else "none"
        out["student"] = model("student")
        out["teacher"] = model("teacher") if cfg.get("teacher") else "none"
        paper = cfg.get("paper") if isinstance(cfg.get("paper"), dict) else {}
        if paper.get("row") is not None:
            out["row"], out["column"] = str(paper.get("row")), str(paper.get("column"))
        if cfg.get("seed") is not None:
            out["seed"] = str(cfg["seed"])
    return out


def _describe(facts: dict[str, str], keys: list[str]) -> str:
    return " ".join(facts[k] if k in ("recipe", "balancer") else f"{k}={facts[k]}" for k in keys if k in facts)


def _identity(facts: dict[str, str]) -> list[str]:
    """The facts that name one run on their own: the recipe (or the model pair) + balancer + seed."""
    if "recipe" in facts:
        return ["recipe", "balancer", "seed"]
    return ["student", "teacher", "balancer", "distill", "seed"]


def run_labels(run_dirs: list[Path]) -> dict[Path, str]:
    """Legend labels from the runs' configs (never the time-of-day directory names): the facts that differ
    between the runs, e.g. ``dto seed=1`` for a balancer x seed sweep of one recipe; a single run (or runs
    that differ in no fact) is named by its recipe, balancer and seed. Runs that still share a label get
    their directory name appended."""
    facts = {d: _facts(d) for d in run_dirs}
    keys = [k for k in FACT_KEYS if len({f.get(k) for f in facts.values()}) > 1]
    labels = {d: _describe(f, keys) if keys else _describe(f, _identity(f)) for d, f in facts.items()}
    labels = {d: lab or d.name for d, lab in labels.items()}
    if len(set(labels.values())) < len(labels):
        labels = {d: f"{labels[d]} ({d.name})" if labels[d] != d.name else d.name for d in run_dirs}
    return labels


def common_label(run_dirs: list[Path]) -> str:
    """What all the runs share (recipe, balancer, seed, ... that do not differ): a figure title."""
    facts = [_facts(d) for d in run_dirs]
    if not facts:
        return ""
    same = [k for k in FACT_KEYS if all(k in f for f in facts) and len({f[k] for f in facts}) == 1]
    shown = [k for k in same if k in _identity(facts[0])] or same
    return _describe(facts[0], shown)


# ---------------------------------------------------------------------------------------------------
# What is drawn (pure).


@dataclass
class Line2D:
    label: str
    x: list[float]
    y: list[float]
    linestyle: str = "-"
    linewidth: float = 1.2


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str
    lines: list[Line2D] = field(default_factory=list)
    yscale: str = "linear"
    hline: float | None = None  # a reference line (0 for the conflict score, 1 for dominance)
    shade_below: str | None = None  # label of the region under `hline` (the conflict side)


def _finite(xs: list[int], ys: list[float], positive: bool = False) -> tuple[list[float], list[float]]:
    # Non-finite points cannot be drawn; on a log axis neither can values <= 0.
    keep = [(float(x), y) for x, y in zip(xs, ys) if math.isfinite(y) and (y > 0 or not positive)]
    return [x for x, _ in keep], [y for _, y in keep]


# π lines of one run often coincide (fixed weights 0.5/0.5, π at its start): each objective gets its own
# dash pattern, drawn thinner on top of the previous, so every one stays visible.
PI_STYLES = [("-", 2.6), ("--", 1.6), (":", 1.6), ("-.", 1.2)]


def figure_data(run_dirs: list[Path]) -> dict[str, list[Panel]]:
    """``{png name: panels}`` for the runs; a figure without any data is left out."""
    data = {d: series(d) for d in run_dirs}
    labels = run_labels(run_dirs)
    conflict = Panel("Gradient conflict ⟨g_distill, g_task⟩ (< 0: the objectives conflict)", "iteration",
                     "conflict score", hline=0.0, shade_below="conflict (< 0)")
    dominance = Panel("Gradient dominance ‖g_distill‖ / ‖g_task‖ (> 1: distillation dominates)", "iteration",
                      "dominance (log scale)", yscale="log", hline=1.0)
    val = Panel("Validation top-1", "epoch", "val top-1 (%)")
    pis = []
    for d in run_dirs:
        s = data[d]
        if "grad/conflict" in s:
            conflict.lines.append(Line2D(labels[d], *_finite(*s["grad/conflict"])))
        if "grad/dominance" in s:
            dominance.lines.append(Line2D(labels[d], *_finite(*s["grad/dominance"], positive=True)))
        if "val/top1" in s:
            steps, top1 = s["val/top1"]
            epoch = dict(zip(*s.get("val/epoch", ([], []))))
            # Epochs from the val rows; a log without them (older runs) falls back to 1, 2, ...
            xs = [epoch.get(st, float(i + 1)) for i, st in enumerate(steps)]
            val.lines.append(Line2D(labels[d], *_finite(xs, list(top1))))
        pi_tags = sorted(t for t in s if t.startswith("pi/"))
        if pi_tags:
            lines = []
            for i, t in enumerate(pi_tags):
                style, width = PI_STYLES[i % len(PI_STYLES)]
                lines.append(Line2D(t.removeprefix("pi/"), *_finite(*s[t]), linestyle=style, linewidth=width))
            pis.append(Panel(f"Objective weights π: {labels[d]}", "iteration", "π", lines))
    out = {}
    for p in (conflict, dominance, val, *pis):
        p.lines = [line for line in p.lines if line.x]  # a run whose values were all non-finite
    if conflict.lines or dominance.lines:
        out["gradient_dynamics.png"] = [p for p in (conflict, dominance) if p.lines]
    if any(p.lines for p in pis):
        out["pi.png"] = [p for p in pis if p.lines]
    if val.lines:
        out["val_top1.png"] = [val]
    return out


# ---------------------------------------------------------------------------------------------------
# Drawing.


def draw(panels: list[Panel], title: str | None = None) -> Any:
    """A matplotlib Figure with one axis per panel (Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    ncols = 2 if len(panels) == 2 else 1
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.4 * ncols, 3.8 * nrows), squeeze=False)
    for ax, p in zip(axes.flat, panels):
        for line in p.lines:
            few = len(line.x) < 30  # a short run: show the points themselves
            ax.plot(line.x, line.y, label=line.label, linewidth=line.linewidth, linestyle=line.linestyle,
                    marker="o" if few else None, markersize=3 if few else None)
        if p.hline is not None:
            ax.axhline(p.hline, color="0.6", linewidth=0.8, linestyle="--")
        ax.set_yscale(p.yscale)
        if p.yscale == "log":  # plain numbers (0.5, 2, 3) rather than 3×10⁰ on a short log range
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        if p.shade_below is not None and p.hline is not None:
            lo, hi = ax.get_ylim()
            if lo < p.hline:  # shade and name the conflict side when the data reach it
                ax.axhspan(lo, p.hline, color="tab:red", alpha=0.07, linewidth=0)
                ax.text(0.01, 0.02, p.shade_below, transform=ax.transAxes, fontsize=7, color="tab:red",
                        va="bottom", ha="left")
            ax.set_ylim(lo, hi)
        # Iterations and epochs are counts: integer ticks (a 2-epoch run otherwise gets 1.0, 1.2, ... 2.0).
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(p.title, fontsize=10)
        ax.set_xlabel(p.xlabel)
        ax.set_ylabel(p.ylabel)
        ax.grid(alpha=0.3)
        if p.lines:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def write_figures(run_dirs: list[Path], out_dir: Path) -> list[Path]:
    """Draw every figure of :func:`figure_data` into ``out_dir``; returns the PNG paths."""
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    title = common_label(run_dirs)
    written = []
    for name, panels in figure_data(run_dirs).items():
        fig = draw(panels, title)
        path = out_dir / name
        fig.savefig(path, dpi=120)
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
