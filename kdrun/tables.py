"""``kdrun tables``: lay finished runs out as the papers' tables, next to the published numbers.

    kdrun tables --table cifar100 [--metric final|best] [--format markdown|latex|csv] RUNS_DIR...

Every ``results.json`` under the given directories (searched recursively) is read; its resolved config's
``paper`` node (``{table, row, column, also: [{table, row, column}, ...]}``, set by the recipes) says
which cell(s) of which table the run belongs to. Per cell the table shows the paper's number, kdrun's
mean ± sample standard deviation over the runs (seeds) of that cell, their count n, and the difference
Δ = kdrun mean − paper. Missing values are blanks ("—"). The table layouts and the published numbers
live in ``kdrun/paper_numbers.yaml`` (``--definitions PATH`` uses another file with the same schema).

The functions below are pure (definitions + results in, cells/strings out), so that the tests can check
the statistics without going through the command line.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

DEFINITIONS = Path(__file__).resolve().parent / "paper_numbers.yaml"
BLANK = "—"
METRICS = {"final": "final top-1 (last epoch)", "best": "best top-1 (best val epoch)"}


# ---------------------------------------------------------------------------------------------------
# Definitions.


@dataclass(frozen=True)
class Line:
    """A row or a column of a table."""

    id: str
    label: str
    reference: bool = False    # paper-only: kdrun has no recipe for it
    aggregate: str | None = None  # "mean": average of the other lines' cells
    from_teacher: bool = False  # kdrun value = the teacher accuracy measured by the runs of the column


@dataclass
class TableDef:
    name: str
    title: str
    metric: str
    rows: list[Line]
    columns: list[Line]
    paper: dict[tuple[str, str], float] = field(default_factory=dict)
    sources: dict[tuple[str, str], str] = field(default_factory=dict)


class TableError(ValueError):
    """A bad definitions file or command line; the message is for the user."""


def _line(d: Any, where: str) -> Line:
    if not isinstance(d, dict) or "id" not in d:
        raise TableError(f"{where}: every row/column needs an `id` (got {d!r})")
    agg = d.get("aggregate")
    if agg not in (None, "mean"):
        raise TableError(f"{where}.{d['id']}: aggregate must be 'mean' (got {agg!r})")
    return Line(str(d["id"]), str(d.get("label", d["id"])), bool(d.get("reference", False)), agg,
                bool(d.get("from_teacher", False)))


def load_definitions(path: str | Path | None = None) -> dict[str, TableDef]:
    """Parse a definitions file (default: the bundled ``paper_numbers.yaml``)."""
    path = Path(path) if path else DEFINITIONS
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise TableError(f"cannot read table definitions {path}: {e}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("tables"), dict):
        raise TableError(f"{path}: expected a top-level `tables:` mapping")
    out = {}
    for name, t in raw["tables"].items():
        rows = [_line(r, f"{name}.rows") for r in t.get("rows") or []]
        cols = [_line(c, f"{name}.columns") for c in t.get("columns") or []]
        if not rows or not cols:
            raise TableError(f"{path}: table {name} needs rows and columns")
        td = TableDef(str(name), str(t.get("title", name)), str(t.get("metric", "top-1 (%)")), rows, cols)
        row_ids, col_ids = {r.id for r in rows}, {c.id for c in cols}
        for n in t.get("numbers") or []:
            key = (str(n["row"]), str(n["column"]))
            if key[0] not in row_ids or key[1] not in col_ids:
                raise TableError(f"{path}: table {name} has a number for unknown cell {key}")
            td.paper[key] = float(n["value"])
            td.sources[key] = str(n.get("source", ""))
        out[str(name)] = td
    return out


# ---------------------------------------------------------------------------------------------------
# Results.


@dataclass
class Run:
    path: Path
    results: dict[str, Any]

    @property
    def cells(self) -> list[tuple[str, str, str]]:
        return paper_cells(self.results.get("config") or {})


def paper_cells(config: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The (table, row, column) cells a run's config claims: ``paper`` plus ``paper.also``."""
    p = config.get("paper")
    if not isinstance(p, dict):
        return []
    cells = []
    for c in [p, *(p.get("also") or [])]:
        if isinstance(c, dict) and all(c.get(k) is not None for k in ("table", "row", "column")):
            cells.append((str(c["table"]), str(c["row"]), str(c["column"])))
    return cells


def find_runs(dirs: Iterable[str | Path]) -> list[Run]:
    """Every readable ``results.json`` under ``dirs`` (recursively), each run once."""
    seen: set[Path] = set()
    runs = []
    for d in dirs:
        d = Path(d)
        files = [d] if d.is_file() else sorted(d.rglob("results.json"))
        for f in files:
            real = f.resolve()
            if real in seen:
                continue
            seen.add(real)
            try:
                runs.append(Run(f.parent, json.loads(f.read_text())))
            except (OSError, json.JSONDecodeError) as e:
                print(f"kdrun tables: skipping unreadable {f} ({e})", file=sys.stderr)
    return runs


def top1(results: dict[str, Any], metric: str) -> float | None:
    v = (results.get(metric) or {}).get("top1")
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def collect(table: TableDef, runs: list[Run], metric: str) -> dict[tuple[str, str], list[float]]:
    """kdrun's values per (row, column) of ``table``: one per run (seed) that claims the cell; for
    ``from_teacher`` rows, the distinct teacher accuracies measured by the runs of the column (every
    run of a column evaluates the same pretrained teacher, so they are one measurement, not n)."""
    values: dict[tuple[str, str], list[float]] = {}
    teacher_rows = [r.id for r in table.rows if r.from_teacher]
    for run in runs:
        for t, row, col in run.cells:
            if t != table.name:
                continue
            v = top1(run.results, metric)
            if v is not None:
                values.setdefault((row, col), []).append(v)
            tv = (run.results.get("teacher") or {}).get("top1")
            if tv is not None:
                for tr in teacher_rows:
                    vals = values.setdefault((tr, col), [])
                    if round(float(tv), 6) not in {round(x, 6) for x in vals}:
                        vals.append(float(tv))
    return values


@dataclass
class Cell:
    paper: float | None
    mean: float | None
    std: float | None  # sample std (n - 1); None for n < 2
    n: int

    @property
    def delta(self) -> float | None:
        return None if self.paper is None or self.mean is None else self.mean - self.paper


def summarise(values: list[float], paper: float | None) -> Cell:
    if not values:
        return Cell(paper, None, None, 0)
    return Cell(paper, statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None,
                len(values))


def build_cells(table: TableDef, runs: list[Run], metric: str) -> dict[tuple[str, str], Cell]:
    """Every cell of ``table``, aggregates included (mean of the kdrun means of the averaged cells,
    only when all of them have runs; n is then the smallest n among them)."""
    vals = collect(table, runs, metric)
    cells = {(r.id, c.id): summarise(vals.get((r.id, c.id), []), table.paper.get((r.id, c.id)))
             for r in table.rows for c in table.columns}
    plain_rows = [r.id for r in table.rows if not r.aggregate]
    plain_cols = [c.id for c in table.columns if not c.aggregate]
    for r in table.rows:
        for c in table.columns:
            if r.aggregate and c.aggregate:
                parts = [cells[(a, b)] for a in plain_rows for b in plain_cols]
            elif c.aggregate:
                parts = [cells[(r.id, b)] for b in plain_cols]
            elif r.aggregate:
                parts = [cells[(a, c.id)] for a in plain_rows]
            else:
                continue
            cell = cells[(r.id, c.id)]
            if parts and all(p.mean is not None for p in parts):
                cell.mean = statistics.fmean(p.mean for p in parts)  # type: ignore[misc]
                cell.n = min(p.n for p in parts)
    return cells


# ---------------------------------------------------------------------------------------------------
# Rendering.


def _f(v: float | None, signed: bool = False) -> str:
    if v is None:
        return BLANK
    return f"{v:+.2f}" if signed else f"{v:.2f}"


def cell_text(cell: Cell, latex: bool = False) -> str:
    """``paper / mean ± std (n) / Δ``; blanks for what is missing."""
    pm = r"\,$\pm$\," if latex else " ± "
    if cell.mean is None:
        kd = BLANK
    elif cell.std is None:
        kd = f"{cell.mean:.2f} (n={cell.n})"
    else:
        kd = f"{cell.mean:.2f}{pm}{cell.std:.2f} (n={cell.n})"
    delta = _f(cell.delta, signed=True)
    if latex:
        delta = delta.replace("-", "$-$") if delta != BLANK else "--"
        return f"{_f(cell.paper).replace(BLANK, '--')} / {kd.replace(BLANK, '--')} / {delta}"
    return f"{_f(cell.paper)} / {kd} / {delta}"


def legend(table: TableDef, metric: str, n_runs: int) -> str:
    return (f"{table.title}\nmetric: kdrun {METRICS[metric]}; paper: {table.metric}. "
            f"Cell: paper / kdrun mean ± std over seeds (n runs) / Δ = kdrun − paper; {BLANK} = none. "
            f"{n_runs} run(s) matched this table.")


def render_markdown(table: TableDef, cells: dict[tuple[str, str], Cell], metric: str, n_runs: int) -> str:
    lines = [f"**{legend(table, metric, n_runs).splitlines()[0]}**", "",
             legend(table, metric, n_runs).splitlines()[1], ""]
    lines.append("| | " + " | ".join(c.label for c in table.columns) + " |")
    lines.append("|---" * (len(table.columns) + 1) + "|")
    for r in table.rows:
        label = r.label + (" *(paper only)*" if r.reference else "")
        lines.append(f"| {label} | " + " | ".join(cell_text(cells[(r.id, c.id)]) for c in table.columns) + " |")
    return "\n".join(lines) + "\n"


def _tex(s: str) -> str:
    return (s.replace("\\", r"\textbackslash{}").replace("&", r"\&").replace("%", r"\%").replace("_", r"\_")
            .replace("#", r"\#").replace("->", r"$\to$").replace("Δ", r"$\Delta$").replace("±", r"$\pm$")
            .replace("—", "--").replace("−", "$-$"))


def render_latex(table: TableDef, cells: dict[tuple[str, str], Cell], metric: str, n_runs: int) -> str:
    title, note = legend(table, metric, n_runs).splitlines()
    lines = [f"% {title}", f"% {note}", r"\begin{tabular}{l" + "c" * len(table.columns) + "}", r"\toprule",
             " & ".join(["Method", *(_tex(c.label) for c in table.columns)]) + r" \\", r"\midrule"]
    for r in table.rows:
        label = _tex(r.label) + (r"$^\dagger$" if r.reference else "")
        lines.append(" & ".join([label, *(cell_text(cells[(r.id, c.id)], latex=True) for c in table.columns)])
                     + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}",
              r"% cell: paper / kdrun mean $\pm$ std (n) / $\Delta$; $^\dagger$ paper-only row"]
    return "\n".join(lines) + "\n"


def render_csv(table: TableDef, cells: dict[tuple[str, str], Cell], metric: str, n_runs: int) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["table", "metric", "row", "row_label", "column", "column_label", "paper", "kdrun_mean",
                "kdrun_std", "n", "delta", "source"])
    for r in table.rows:
        for c in table.columns:
            cell = cells[(r.id, c.id)]
            w.writerow([table.name, metric, r.id, r.label, c.id, c.label,
                        "" if cell.paper is None else f"{cell.paper:.2f}",
                        "" if cell.mean is None else f"{cell.mean:.4f}",
                        "" if cell.std is None else f"{cell.std:.4f}", cell.n,
                        "" if cell.delta is None else f"{cell.delta:.4f}", table.sources.get((r.id, c.id), "")])
    return buf.getvalue()


RENDERERS = {"markdown": render_markdown, "latex": render_latex, "csv": render_csv}


def render(table: TableDef, runs: list[Run], metric: str = "final", fmt: str = "markdown") -> str:
    """The whole table as text, from the runs (already loaded) and a definition."""
    if metric not in METRICS:
        raise TableError(f"--metric {metric!r}: choose one of {', '.join(METRICS)}")
    if fmt not in RENDERERS:
        raise TableError(f"--format {fmt!r}: choose one of {', '.join(RENDERERS)}")
    cells = build_cells(table, runs, metric)
    n = sum(1 for run in runs if any(t == table.name for t, _, _ in run.cells))
    return RENDERERS[fmt](table, cells, metric, n)


def unplaced(table: TableDef, runs: list[Run]) -> list[Run]:
    """Runs that name this table but a row/column it does not have (a typo or a stale recipe)."""
    rows, cols = {r.id for r in table.rows}, {c.id for c in table.columns}
    return [run for run in runs for t, r, c in run.cells if t == table.name and (r not in rows or c not in cols)]


# ---------------------------------------------------------------------------------------------------
# Command line.


def main(argv: list[str] | None = None) -> int:
    """``kdrun tables``; returns the exit status (0 ok, 2 bad usage)."""
    p = argparse.ArgumentParser(prog="kdrun tables", description="Lay results.json files out as the papers' "
                                "tables: paper number / kdrun mean ± std (n seeds) / delta per cell.")
    p.add_argument("runs", nargs="+", metavar="RUNS_DIR", help="directories searched recursively for results.json")
    p.add_argument("--table", required=True, help="table name (imagenet, cifar100, cifar100_dynamic, "
                   "cifar100_dynamic_mtl, or one of --definitions)")
    p.add_argument("--metric", default="final", choices=sorted(METRICS), help="final: last-epoch top-1 (default); "
                   "best: best val top-1")
    p.add_argument("--format", default="markdown", choices=sorted(RENDERERS))
    p.add_argument("--definitions", default=None, help="table definitions YAML (default: kdrun/paper_numbers.yaml)")
    a = p.parse_args(argv)
    try:
        defs = load_definitions(a.definitions)
        if a.table not in defs:
            raise TableError(f"unknown table {a.table!r}; valid tables are {', '.join(defs)}")
        missing = [d for d in a.runs if not Path(d).exists()]
        if missing:
            raise TableError(f"no such directory: {', '.join(missing)}")
        runs = find_runs(a.runs)
        table = defs[a.table]
        text = render(table, runs, a.metric, a.format)
    except TableError as e:
        print(f"kdrun tables: error: {e}", file=sys.stderr)
        return 2
    bad = unplaced(table, runs)
    if bad:
        print(f"kdrun tables: {len(bad)} run(s) name cells that table {a.table} does not have, e.g. "
              f"{bad[0].path}: {bad[0].cells}", file=sys.stderr)
    if not any(t == a.table for run in runs for t, _, _ in run.cells):
        print(f"kdrun tables: no run under {', '.join(a.runs)} belongs to table {a.table} "
              f"({len(runs)} results.json found); showing the paper's numbers only", file=sys.stderr)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
