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


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``run_dir/metrics.jsonl`` (non-finite values come back as floats, e.g. nan)."""
    rows = []
    with open(Path(run_dir) / "metrics.jsonl") as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


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


def _facts(run_dir: Path) -> dict[str, str]:
    """What tells runs apart, from the resolved config the engine saved (config.yaml)."""
    import yaml

    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}

    def model(role: str) -> str:
        node = (cfg.get(role) or {}).get("model") or {}
        return str(node.get("model_name") or str(node.get("_target_", "")).rsplit(".", 1)[-1])

    paper = cfg.get("paper") or {}
    return {"balancer": str((cfg.get("balancer") or {}).get("_target_", "")).rsplit(".", 1)[-1],
            "distill": "+".join(cfg.get("distill") or {}) or "none", "student": model("student"),
            "teacher": model("teacher") if cfg.get("teacher") else "none",
            "row": str(paper.get("row")), "column": str(paper.get("column")), "seed": str(cfg.get("seed"))}


def run_labels(run_dirs: list[Path]) -> dict[Path, str]:
    """Short legend labels: the config facts that differ between the runs (balancer, seed, ...), e.g.
    ``DTO seed=1``; the run directory's name when no fact differs or labels would collide."""
    facts = {d: _facts(d) for d in run_dirs}
    keys = [k for k in ("balancer", "distill", "student", "teacher", "row", "column", "seed")
            if len({f.get(k) for f in facts.values()}) > 1]
    labels = {d: " ".join(f[k] if k == "balancer" else f"{k}={f[k]}" for k in keys if k in f) or d.name
              for d, f in facts.items()}
    if len(set(labels.values())) < len(labels):
        labels = {d: f"{labels[d]} ({d.name})" if labels[d] != d.name else d.name for d in run_dirs}
    return labels


# ---------------------------------------------------------------------------------------------------
# What is drawn (pure).


@dataclass
class Line2D:
    label: str
    x: list[float]
    y: list[float]


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str
    lines: list[Line2D] = field(default_factory=list)
    yscale: str = "linear"
    hline: float | None = None  # a reference line (0 for the conflict score, 1 for dominance)


def _finite(xs: list[int], ys: list[float], positive: bool = False) -> tuple[list[float], list[float]]:
    # Non-finite points cannot be drawn; on a log axis neither can values <= 0.
    keep = [(float(x), y) for x, y in zip(xs, ys) if math.isfinite(y) and (y > 0 or not positive)]
    return [x for x, _ in keep], [y for _, y in keep]


def figure_data(run_dirs: list[Path]) -> dict[str, list[Panel]]:
    """``{png name: panels}`` for the runs; a figure without any data is left out."""
    data = {d: series(d) for d in run_dirs}
    labels = run_labels(run_dirs)
    conflict = Panel("Gradient conflict ⟨g_distill, g_task⟩", "iteration", "conflict score", hline=0.0)
    dominance = Panel("Gradient dominance ‖g_distill‖ / ‖g_task‖", "iteration", "dominance (log scale)",
                      yscale="log", hline=1.0)
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
            val.lines.append(Line2D(labels[d], xs, list(top1)))
        pi_tags = sorted(t for t in s if t.startswith("pi/"))
        if pi_tags:
            pis.append(Panel(f"Objective weights π: {labels[d]}", "iteration", "π",
                             [Line2D(t.removeprefix("pi/"), *_finite(*s[t])) for t in pi_tags]))
    out = {}
    if conflict.lines or dominance.lines:
        out["gradient_dynamics.png"] = [p for p in (conflict, dominance) if p.lines]
    if pis:
        out["pi.png"] = pis
    if val.lines:
        out["val_top1.png"] = [val]
    return out


# ---------------------------------------------------------------------------------------------------
# Drawing.


def draw(panels: list[Panel]) -> Any:
    """A matplotlib Figure with one axis per panel (Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = 2 if len(panels) == 2 else 1
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.4 * ncols, 3.8 * nrows), squeeze=False)
    for ax, p in zip(axes.flat, panels):
        for line in p.lines:
            ax.plot(line.x, line.y, label=line.label, linewidth=1.2, marker="." if len(line.x) < 30 else None)
        if p.hline is not None:
            ax.axhline(p.hline, color="0.6", linewidth=0.8, linestyle="--")
        ax.set_yscale(p.yscale)
        ax.set_title(p.title, fontsize=10)
        ax.set_xlabel(p.xlabel)
        ax.set_ylabel(p.ylabel)
        ax.grid(alpha=0.3)
        if p.lines:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def write_figures(run_dirs: list[Path], out_dir: Path) -> list[Path]:
    """Draw every figure of :func:`figure_data` into ``out_dir``; returns the PNG paths."""
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, panels in figure_data(run_dirs).items():
        fig = draw(panels)
        path = out_dir / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    """``kdrun plot``; returns the exit status (0 ok, 2 nothing to plot)."""
    p = argparse.ArgumentParser(prog="kdrun plot", description="PNG figures from runs' metrics.jsonl: gradient "
                                "conflict/dominance (DTO-KD Fig. 1), π per objective (Fig. 3), val top-1.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (or directories holding runs)")
    p.add_argument("--out", default=None, help="output directory (default: RUN_DIR/plots for one run, "
                   "./kdrun_plots for several)")
    a = p.parse_args(argv)
    dirs = find_run_dirs(a.runs)
    if not dirs:
        print(f"kdrun plot: error: no metrics.jsonl under {', '.join(a.runs)}", file=sys.stderr)
        return 2
    out = Path(a.out) if a.out else (dirs[0] / "plots" if len(dirs) == 1 else Path("kdrun_plots"))
    written = write_figures(dirs, out)
    if not written:
        print("kdrun plot: error: the runs logged none of grad/conflict, grad/dominance, pi/*, val/top1",
              file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
