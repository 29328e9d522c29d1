"""``kdrun tables``: lay finished runs out as the papers' tables, next to the published numbers, or as a
sweep, one row per setting of what the runs vary; with the uncertainty of every mean.

    kdrun tables --table cifar100 [--metric final|best] [--seeds all|0,1,2] [--duplicates error|newest|oldest]
                 [--baseline ROW|COLUMN|none] [--format markdown|latex|csv] RUNS_DIR...
    kdrun tables SWEEP_DIR... [--by KEY,...] [--baseline ROW|none] [--metric final|best] ...

Every ``results.json`` under the given directories (searched recursively) is read; its resolved config's
``paper`` node (``{table, row, column, also: [{table, row, column}, ...]}``, set by the recipes) says
which cell(s) of which table the run belongs to. Per cell the table shows the paper's number, kdrun's
mean ± sample standard deviation over the runs (seeds) of that cell, their count n, and the difference
Δ = kdrun mean − paper. Missing values are blanks ("—"). The table layouts and the published numbers
live in ``kdrun/analysis/paper_numbers.yaml`` (``--definitions PATH`` uses another file with the same schema).

Each table declares the paper's reporting convention (``convention: best|final``, with its source) and
its seeds; both are defaults the command line can override, and the output says which it shows:

* ``--metric`` (default: the table's ``convention``): ``best`` = the epoch with the best primary metric,
  as mdistiller's trainer and DeiT's ``main.py`` print it (the CIFAR and ImageNet tables); ``final`` =
  the last epoch, as ViDT's ``main.py`` (no best tracking) and RepDistiller's own CRD numbers (its
  ``train_student.py`` says so) report it.
* ``--seeds`` (default: the table's ``seeds``): only runs whose config ``seed`` is listed count. A recipe
  that two tables share (the CIFAR KD baselines: DTO-KD Table 2 with 3 seeds, cross-batch Tables 1-2
  with 5 trials) then gives n = 3 in one table and n = 5 in the other by declaration, and the legend
  says how many runs of other seeds were left out. ``--seeds all`` counts every run.

Which number of a run a table shows is its *metrics*: ``results.json[final|best][key] × scale`` —
``top1`` (× 1) for the classification tables, COCO's ``AP``, ``AP50``, … (× 100: pycocotools gives
0..1, the papers print percentages) for the detection ones. A table with several metrics (COCO: six per
run) keeps one cell per (row, column) — one group of runs — and shows every metric of it: rendered in
the papers' layout, one block of rows per column with the metrics as the table's columns. Negative
values (COCO's −1 for an area range without ground truth) count as missing.

Uncertainty: every cell also shows the 95 % confidence interval of its mean (:func:`t_interval`,
Student's t with n − 1 degrees of freedom; none for n < 2), and every cell its difference to the
baseline's cell paired by seed (:func:`paired_difference`: d_s = x_s − b_s over the seeds both ran, mean
and t-interval of d, i.e. a paired t-test). The baseline (:func:`resolve_baseline`) is a paper table's
``kd`` row when it has one, a sweep's first row, or ``--baseline``.

Without ``--table`` the runs are one sweep (:func:`sweep_table`): the override keys whose values differ
between them make the rows (:func:`kdrun.analysis.sweep.group_runs`; ``--by`` chooses the row keys, the other
swept keys then make the columns), seeds are the replicates, the value is the runs' primary metric.

A cell averages one value per seed. Two runs of one cell with the same seed (the same run copied, or
re-run, into two of the directories given) would count that seed twice and shrink the spread, so they are
an error naming both directories; ``--duplicates newest|oldest`` instead counts the run whose
``results.json`` was written last (first) of each such seed.

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
from typing import Any, Iterable, Sequence

import yaml

DEFINITIONS = Path(__file__).resolve().parent / "paper_numbers.yaml"
BLANK = "—"
METRICS = {"final": ("final", "(last epoch)"), "best": ("best", "(best val epoch)")}


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


@dataclass(frozen=True)
class Metric:
    """One number of a run: ``results.json[final|best][key] × scale``."""

    key: str = "top1"
    label: str = "top-1"
    scale: float = 1.0


TOP1 = Metric()


@dataclass
class TableDef:
    name: str
    title: str
    metric: str                     # what the paper's numbers are (printed in the legend)
    rows: list[Line]
    columns: list[Line]
    metrics: list[Metric] = field(default_factory=lambda: [TOP1])
    convention: str = "final"       # the paper's: best (epoch) or final (last epoch); --metric's default
    convention_source: str = ""     # where that convention is documented (printed in the legend)
    seeds: tuple[int, ...] | None = None  # the seeds a cell averages (None: every run); --seeds' default
    seeds_source: str = ""
    # published numbers and their sources, per (row, column, metric key)
    numbers: dict[tuple[str, str, str], float] = field(default_factory=dict)
    number_sources: dict[tuple[str, str, str], str] = field(default_factory=dict)
    # False for a sweep's table (:func:`sweep_table`): no paper numbers, cells show kdrun's alone
    from_paper: bool = True
    note: str = ""                  # what the rows are (a sweep's grouping), printed in the legend

    def paper_for(self, key: str) -> dict[tuple[str, str], float]:
        """The paper's numbers of one metric, per (row, column)."""
        return {(r, c): v for (r, c, k), v in self.numbers.items() if k == key}

    @property
    def paper(self) -> dict[tuple[str, str], float]:
        """The paper's numbers of the first (primary) metric, per (row, column)."""
        return self.paper_for(self.metrics[0].key)

    @property
    def sources(self) -> dict[tuple[str, str], str]:
        k0 = self.metrics[0].key
        return {(r, c): v for (r, c, k), v in self.number_sources.items() if k == k0}


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


def _metric(d: Any, where: str) -> Metric:
    if isinstance(d, str):
        d = {"key": d}
    if not isinstance(d, dict) or "key" not in d:
        raise TableError(f"{where}: every metric needs a `key` (got {d!r})")
    try:
        scale = float(d.get("scale", 1.0))
    except (TypeError, ValueError):
        raise TableError(f"{where}.{d['key']}: scale must be a number (got {d.get('scale')!r})") from None
    return Metric(str(d["key"]), str(d.get("label", d["key"])), scale)


def load_definitions(path: str | Path | None = None) -> dict[str, TableDef]:
    """Parse a definitions file (default: the bundled ``paper_numbers.yaml``)."""
    path = Path(path) if path else DEFINITIONS
    fix = f"pass a YAML file with the schema of {DEFINITIONS} to --definitions"
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise TableError(f"cannot read table definitions {path} ({e.strerror or e}); {fix}") from None
    except UnicodeDecodeError:
        raise TableError(f"table definitions {path} is not text (a binary file?); {fix}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:  # its message spans lines (the problem, then a caret under the line)
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise TableError(f"table definitions {path} is not valid YAML ({what}{where}); {fix}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("tables"), dict):
        raise TableError(f"{path}: expected a top-level `tables:` mapping; {fix}")
    out = {}
    for name, t in raw["tables"].items():
        try:
            out[str(name)] = _table(path, name, t)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            if isinstance(e, TableError):
                raise
            # a field of the wrong type or missing deep inside a table: name the table and the file
            raise TableError(f"{path}: table {name} is malformed ({type(e).__name__}: {e}); {fix}") from None
    return out


def _table(path: Path, name: Any, t: Any) -> TableDef:
    """One table of a definitions file (see :func:`load_definitions`)."""
    if not isinstance(t, dict):
        raise TableError(f"{path}: table {name} must be a mapping (title, rows, columns, numbers, ...), "
                         f"not {_json_type(t)}")
    for key in ("rows", "columns", "metrics", "numbers"):
        if t.get(key) is not None and not isinstance(t[key], list):
            raise TableError(f"{path}: table {name}: {key} must be a list, not {_json_type(t[key])}")
    rows = [_line(r, f"{name}.rows") for r in t.get("rows") or []]
    cols = [_line(c, f"{name}.columns") for c in t.get("columns") or []]
    if not rows or not cols:
        raise TableError(f"{path}: table {name} needs rows and columns")
    metrics = [_metric(m, f"{name}.metrics") for m in t.get("metrics") or []] or [TOP1]
    if len({m.key for m in metrics}) != len(metrics):
        raise TableError(f"{path}: table {name} lists a metric key twice")
    convention = t.get("convention", "final")
    if convention not in METRICS:
        raise TableError(f"{path}: table {name}: convention must be one of {', '.join(METRICS)} "
                         f"(got {convention!r})")
    seeds = t.get("seeds")
    if seeds is not None and (not isinstance(seeds, list) or not seeds
                              or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds)):
        raise TableError(f"{path}: table {name}: seeds must be a non-empty list of integers (got {seeds!r})")
    td = TableDef(str(name), str(t.get("title", name)), str(t.get("metric", "top-1 (%)")), rows, cols,
                  metrics, str(convention), str(t.get("convention_source", "")),
                  None if seeds is None else tuple(seeds), str(t.get("seeds_source", "")))
    row_ids, col_ids = {r.id for r in rows}, {c.id for c in cols}
    keys = [m.key for m in metrics]
    for n in t.get("numbers") or []:
        if not isinstance(n, dict) or not all(k in n for k in ("row", "column", "value")):
            raise TableError(f"{path}: table {name}: every entry of numbers needs row, column and value "
                             f"(got {n!r})")
        cell = (str(n["row"]), str(n["column"]))
        if cell[0] not in row_ids or cell[1] not in col_ids:
            raise TableError(f"{path}: table {name} has a number for unknown cell {cell}")
        raw = n["value"]
        if isinstance(raw, list):  # one value per metric, in the order of `metrics`
            if "metric" in n or len(raw) != len(keys):
                raise TableError(f"{path}: table {name}, cell {cell}: a list of values needs one per "
                                 f"metric ({', '.join(keys)}) and no `metric`")
            pairs = list(zip(keys, raw))
        else:
            k = str(n.get("metric", keys[0]))
            if k not in keys:
                raise TableError(f"{path}: table {name}, cell {cell}: unknown metric {k!r}")
            pairs = [(k, raw)]
        for k, v in pairs:
            if v is None:  # a blank of the paper
                continue
            try:  # a string too: PyYAML reads 1e5 (no dot) as one
                number = float(v) if not isinstance(v, bool) else math.nan
            except (TypeError, ValueError):
                number = math.nan
            if not math.isfinite(number):
                raise TableError(f"{path}: table {name}, cell {cell}: value {v!r} is not a number")
            td.numbers[(*cell, k)] = number
            td.number_sources[(*cell, k)] = str(n.get("source", ""))
    return td


# ---------------------------------------------------------------------------------------------------
# Results.


@dataclass
class Run:
    path: Path
    results: dict[str, Any]
    # cells this run does not count in: it duplicates another run's seed there (--duplicates newest|oldest)
    dropped: frozenset[tuple[str, str, str]] = frozenset()
    # the cells of a sweep's table (:func:`sweep_table`) the run is placed in; None: its config's paper cells
    claims: tuple[tuple[str, str, str], ...] | None = None

    @property
    def cells(self) -> list[tuple[str, str, str]]:
        claimed = paper_cells(self.results.get("config") or {}) if self.claims is None else self.claims
        return [c for c in claimed if c not in self.dropped]

    @property
    def seed(self) -> int | None:
        """The seed the run trained with: ``trainer.seed`` when set (it overrides the top-level ``seed``,
        as the engine does), else ``seed``."""
        config = self.results.get("config") or {}
        trainer = config.get("trainer")
        s = trainer.get("seed") if isinstance(trainer, dict) else None
        s = config.get("seed") if s is None else s
        return s if isinstance(s, int) and not isinstance(s, bool) else None

    @property
    def written(self) -> float:
        """When its results.json was written (modification time; 0 if it is gone): --duplicates' order."""
        try:
            return (self.path / "results.json").stat().st_mtime
        except OSError:
            return 0.0


ALL = "all"


def select_seeds(table: TableDef, runs: list[Run], seeds: Sequence[int] | str | None = None
                 ) -> tuple[list[Run], list[Run], tuple[int, ...] | None]:
    """The runs of ``table`` that count, the ones left out, and the seeds used: ``seeds`` = None → the
    table's declared seeds, ``"all"`` → every run, a list → those. A run without a seed in its config
    is left out whenever seeds are selected (it cannot be shown to be one of them)."""
    chosen = table.seeds if seeds is None else (None if seeds == ALL else tuple(int(x) for x in seeds))
    mine = [r for r in runs if any(t == table.name for t, _, _ in r.cells)]
    if chosen is None:
        return mine, [], None
    keep = [r for r in mine if r.seed in chosen]
    return keep, [r for r in mine if r.seed not in chosen], chosen


DUPLICATES = ("error", "newest", "oldest")


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): node}


def config_difference(a: Run, b: Run, at_most: int = 3) -> str:
    """``their configs are the same`` or ``their configs differ in k1, k2, k3 (and N more)``."""
    fa, fb = _flat(a.results.get("config") or {}), _flat(b.results.get("config") or {})
    keys = sorted(k for k in set(fa) | set(fb) if fa.get(k, ...) != fb.get(k, ...))
    if not keys:
        return "their configs are the same"
    more = f" (and {len(keys) - at_most} more)" if len(keys) > at_most else ""
    return f"their configs differ in {', '.join(keys[:at_most])}{more}"


def duplicate_groups(table: TableDef, runs: list[Run]) -> list[tuple[tuple[str, str, str], int | None, list[Run]]]:
    """Every (cell of ``table``, seed) that more than one run claims, with those runs oldest first."""
    by: dict[tuple[tuple[str, str, str], int | None], list[Run]] = {}
    for run in runs:
        for cell in run.cells:
            if cell[0] == table.name:
                by.setdefault((cell, run.seed), []).append(run)
    return [(cell, seed, sorted(rs, key=lambda r: (r.written, str(r.path))))
            for (cell, seed), rs in by.items() if len(rs) > 1]


def resolve_duplicates(table: TableDef, runs: list[Run], policy: str = "error") -> tuple[list[Run], list[str]]:
    """The runs with every duplicated (cell, seed) of ``table`` counted once, and one line per run left out.

    ``policy`` ``error``: a :class:`TableError` naming the first duplicate's directories and the fix;
    ``newest``/``oldest``: keep the run whose results.json was written last/first (the others stop
    counting in that cell only: a run that claims several cells keeps the others)."""
    if policy not in DUPLICATES:
        raise TableError(f"--duplicates {policy!r}: choose one of {', '.join(DUPLICATES)}")
    groups = duplicate_groups(table, runs)
    if not groups:
        return runs, []
    if policy == "error":
        (_, row, col), seed, rs = groups[0]
        more = f"; {len(groups) - 1} more (cell, seed) pair(s) of this table have duplicates too" \
            if len(groups) > 1 else ""
        raise TableError(
            f"table {table.name}, cell ({row}, {col}): seed {'none' if seed is None else seed} has {len(rs)} runs, "
            f"{', '.join(str(r.path) for r in rs)} ({config_difference(rs[0], rs[-1])}), so it would count "
            f"{len(rs)} times in the mean and std{more}. Remove or move the extra run directories, or pass "
            "--duplicates newest (or oldest) to count only the run whose results.json was written last (first).")
    drop: dict[int, set[tuple[str, str, str]]] = {}
    notes = []
    for cell, seed, rs in groups:
        keep = rs[-1] if policy == "newest" else rs[0]
        for r in rs:
            if r is not keep:
                drop.setdefault(id(r), set()).add(cell)
                notes.append(f"cell ({cell[1]}, {cell[2]}) seed {seed}: counting {keep.path} (--duplicates "
                             f"{policy}), not {r.path}")
    out = [Run(r.path, r.results, r.dropped | frozenset(drop[id(r)]), r.claims) if id(r) in drop else r
           for r in runs]
    return out, notes


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


def _json_type(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(
        type(v), "null")


def results_problem(results: Any) -> str | None:
    """Why a parsed results.json cannot be a run's results (wrongly typed), or None."""
    if not isinstance(results, dict):
        return f"holds a JSON {_json_type(results)} at its top level, not an object"
    for key in ("config", "final", "best", "teacher"):
        v = results.get(key)
        if v is not None and not isinstance(v, dict):
            return f"holds {key!r} as a JSON {_json_type(v)}, not an object"
    paper = (results.get("config") or {}).get("paper")
    if paper is not None and not isinstance(paper, dict):
        return f"holds config.paper as a JSON {_json_type(paper)}, not an object"
    return None


def read_results(f: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(results, None) or (None, why the file is skipped): unreadable, not UTF-8 text (a binary file),
    not JSON, or JSON of the wrong shape."""
    try:
        text = f.read_bytes().decode("utf-8")
    except OSError as e:
        return None, f"cannot be read ({e.strerror or e})"
    except UnicodeDecodeError:
        return None, "is not text (a binary file?)"
    try:
        results = json.loads(text)
    except ValueError as e:
        return None, f"is not valid JSON ({e})"
    why = results_problem(results)
    return (None, why) if why else (results, None)


def find_runs(dirs: Iterable[str | Path]) -> list[Run]:
    """Every usable ``results.json`` under ``dirs`` (recursively), each run once; every file that is not
    usable is skipped with one line on stderr saying why."""
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
            results, why = read_results(f)
            if results is None:
                print(f"kdrun tables: skipping {f}: it {why}", file=sys.stderr)
                continue
            runs.append(Run(f.parent, results))
    return runs


def value(node: Any, m: Metric = TOP1) -> float | None:
    """``node[m.key] × m.scale``, or None when absent, not a finite number, or negative (COCO's −1)."""
    v = node.get(m.key) if isinstance(node, dict) else None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        return None
    return float(v) * m.scale


def why_missing(results: dict[str, Any], metric: str, m: Metric = TOP1) -> str:
    """Why ``value(results[metric], m)`` is None, for the line that explains a blank cell."""
    node = results.get(metric)
    if not isinstance(node, dict):
        return f"has no {metric!r} results (a run that did not finish?)"
    if m.key not in node:
        return f"has no {metric}.{m.key}"
    v = node[m.key]
    if v is None:
        return f"has {metric}.{m.key} = null (the run's value was NaN or infinite)"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return f"has {metric}.{m.key} = {json.dumps(v)[:40]}, a JSON {_json_type(v)}, not a number"
    if v < 0:
        return f"has {metric}.{m.key} = {v:g}, negative: missing (COCO writes -1 for an area range without objects)"
    return f"has {metric}.{m.key} = {v!r}, not a finite number"


def blank_reasons(table: TableDef, runs: list[Run], metric: str) -> list[str]:
    """One line per (run, metric) whose value is missing from a cell the run claims in ``table``: the
    cell may show a blank (or a mean over fewer runs), and the user must see why."""
    out = []
    for run in runs:
        for t, row, col in run.cells:
            if t != table.name:
                continue
            for m in table.metrics:
                if value(run.results.get(metric), m) is None:
                    out.append(f"cell ({row}, {col}) has no {m.label} from {run.path / 'results.json'}: it "
                               f"{why_missing(run.results, metric, m)}")
    return out


def top1(results: dict[str, Any], metric: str) -> float | None:
    return value(results.get(metric), TOP1)


def collect_seeded(table: TableDef, runs: list[Run], metric: str, m: Metric | None = None
                   ) -> dict[tuple[str, str], list[tuple[int | None, float]]]:
    """kdrun's values of metric ``m`` (default: the table's first) per (row, column) of ``table``, each with
    the seed of its run: one per run (seed) that claims the cell; for ``from_teacher`` rows, the distinct
    teacher values measured by the runs of the column, without a seed (every run of a column evaluates
    the same pretrained teacher, so they are one measurement, not n)."""
    m = m or table.metrics[0]
    values: dict[tuple[str, str], list[tuple[int | None, float]]] = {}
    teacher_rows = [r.id for r in table.rows if r.from_teacher]
    for run in runs:
        for t, row, col in run.cells:
            if t != table.name:
                continue
            v = value(run.results.get(metric), m)
            if v is not None:
                values.setdefault((row, col), []).append((run.seed, v))
            tv = value(run.results.get("teacher"), m)
            if tv is not None:
                for tr in teacher_rows:
                    vals = values.setdefault((tr, col), [])
                    if round(float(tv), 6) not in {round(x, 6) for _, x in vals}:
                        vals.append((None, float(tv)))
    return values


def collect(table: TableDef, runs: list[Run], metric: str, m: Metric | None = None
            ) -> dict[tuple[str, str], list[float]]:
    """The values of :func:`collect_seeded` without their seeds."""
    return {cell: [v for _, v in vals] for cell, vals in collect_seeded(table, runs, metric, m).items()}


# ---------------------------------------------------------------------------------------------------
# Statistics: the 95 % confidence interval of a mean, and paired differences by seed.

CONFIDENCE = 0.95


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """The ``confidence`` interval of the mean of ``values`` with Student's t: mean ± t(1 − α/2, n − 1) ·
    s/√n, s the sample standard deviation. It treats the values as independent draws of one normal
    quantity (the seeds of one setting). None for n < 2 (no spread to estimate); identical values give
    the zero-width interval [mean, mean]."""
    n = len(values)
    if n < 2:
        return None
    from scipy.stats import t

    mean = statistics.fmean(values)
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * statistics.stdev(values) / math.sqrt(n)
    return mean - half, mean + half


@dataclass(frozen=True)
class Paired:
    """A cell's paired difference to its baseline cell: mean and interval of d_s = x_s − b_s over the seeds
    s both cells have (n of them); ``mean`` None when they share no seed."""

    mean: float | None
    ci: tuple[float, float] | None
    n: int
    baseline: bool = False  # the baseline cell itself

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval says the difference is more than seed noise (at the 95 % level)."""
        return self.ci is not None and (self.ci[0] > 0 or self.ci[1] < 0)


BASELINE_CELL = Paired(None, None, 0, baseline=True)


def paired_difference(x: Sequence[tuple[int | None, float]], b: Sequence[tuple[int | None, float]]) -> Paired:
    """The paired difference of two cells' per-seed values: runs that share a seed are paired (same seed
    = same initialisation and data order, which is what pairing removes from the comparison); seeds that
    only one cell has, and runs without a seed, take no part. Equivalent to a paired t-test
    (scipy.stats.ttest_rel) over the common seeds: the interval excludes 0 exactly when its p < 0.05."""
    xs, bs = dict((s, v) for s, v in x if s is not None), dict((s, v) for s, v in b if s is not None)
    common = sorted(set(xs) & set(bs))
    d = [xs[s] - bs[s] for s in common]
    if not d:
        return Paired(None, None, 0)
    return Paired(statistics.fmean(d), t_interval(d), len(d))


@dataclass
class Cell:
    paper: float | None
    mean: float | None
    std: float | None  # sample std (n - 1); None for n < 2
    n: int
    ci: tuple[float, float] | None = None  # 95 % t-interval of the mean; None for n < 2 and aggregates

    @property
    def delta(self) -> float | None:
        return None if self.paper is None or self.mean is None else self.mean - self.paper


def summarise(values: list[float], paper: float | None) -> Cell:
    if not values:
        return Cell(paper, None, None, 0)
    return Cell(paper, statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None,
                len(values), t_interval(values))


def build_cells(table: TableDef, runs: list[Run], metric: str, key: str | None = None
                ) -> dict[tuple[str, str], Cell]:
    """Every cell of ``table`` for the metric ``key`` (default: the table's first), aggregates included
    (mean of the kdrun means of the averaged cells, only when all of them have runs; n is then the
    smallest n among them; no interval). A ``from_teacher`` row gets no interval either: its values are
    one teacher measured again, not seeds."""
    m = next((x for x in table.metrics if x.key == key), None) if key else table.metrics[0]
    if m is None:
        raise TableError(f"table {table.name} has no metric {key!r}")
    vals = collect(table, runs, metric, m)
    paper = table.paper_for(m.key)
    cells = {(r.id, c.id): summarise(vals.get((r.id, c.id), []), paper.get((r.id, c.id)))
             for r in table.rows for c in table.columns}
    for r in table.rows:
        if r.from_teacher:
            for c in table.columns:
                cells[(r.id, c.id)].ci = None
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


NONE = "none"


def resolve_baseline(table: TableDef, name: str | None) -> tuple[str, str] | None:
    """``("row", id)`` or ``("column", id)`` of the baseline the paired differences compare with, or None.

    ``name`` None: the default, the row ``kd`` (Hinton KD) of a paper table that has one, the first row of
    a sweep's table (the sweep's first value, e.g. ``balancer=fixed_mean``); ``none``: no comparison; else
    a row, or a column (tables whose columns are the methods, cifar100_dynamic_mtl), by id or label."""
    if name is None:
        if not table.from_paper:
            return ("row", table.rows[0].id) if table.rows else None
        return ("row", "kd") if any(r.id == "kd" for r in table.rows) else None
    if name == NONE:
        return None
    for kind, lines in (("row", table.rows), ("column", table.columns)):
        for line in lines:
            if name in (line.id, line.label):
                if line.aggregate or line.reference:
                    raise TableError(f"--baseline {name!r}: that {kind} of table {table.name} has no runs of its "
                                     f"own (an average or a paper-only line); name a row with runs")
                return kind, line.id
    raise TableError(f"--baseline {name!r}: table {table.name} has no such row or column; its rows are "
                     f"{', '.join(r.id for r in table.rows)} and its columns {', '.join(c.id for c in table.columns)} "
                     f"(or --baseline none for no comparison)")


def build_paired(table: TableDef, runs: list[Run], metric: str, key: str | None,
                 baseline: tuple[str, str] | None) -> dict[tuple[str, str], Paired | None]:
    """Every cell's :func:`paired_difference` to its baseline cell (the baseline row's cell of the same
    column, or the baseline column's cell of the same row); None where it does not apply: averages,
    paper-only and teacher lines, or no baseline."""
    m = next((x for x in table.metrics if x.key == key), None) if key else table.metrics[0]
    out: dict[tuple[str, str], Paired | None] = {(r.id, c.id): None for r in table.rows for c in table.columns}
    if baseline is None or m is None:
        return out
    vals = collect_seeded(table, runs, metric, m)
    kind, ident = baseline
    for r in table.rows:
        if r.aggregate or r.reference or r.from_teacher:
            continue
        for c in table.columns:
            if c.aggregate or c.reference:
                continue
            base = (ident, c.id) if kind == "row" else (r.id, ident)
            if base == (r.id, c.id):
                out[base] = BASELINE_CELL
            elif (r.id, c.id) in vals and base in vals:
                out[(r.id, c.id)] = paired_difference(vals[(r.id, c.id)], vals[base])
    return out


# ---------------------------------------------------------------------------------------------------
# Rendering.


def _f(v: float | None, signed: bool = False) -> str:
    if v is None:
        return BLANK
    return f"{v:+.2f}" if signed else f"{v:.2f}"


def kdrun_text(cell: Cell, latex: bool = False) -> str:
    """``mean ± std (n=3) [lo, hi]``: the seeds' mean, sample std and count, and the 95 % interval of the
    mean (``[n/a]`` for a single run, nothing for an average of cells)."""
    pm = r"\,$\pm$\," if latex else " ± "
    if cell.mean is None:
        return BLANK
    text = f"{cell.mean:.2f}" + ("" if cell.std is None else f"{pm}{cell.std:.2f}") + f" (n={cell.n})"
    if cell.ci is not None:
        text += f" [{cell.ci[0]:.2f}, {cell.ci[1]:.2f}]"
    elif cell.n < 2:
        text += " [n/a]"
    return text


def cell_text(cell: Cell, latex: bool = False, paper: bool = True) -> str:
    """``paper / mean ± std (n) [95 % CI] / Δ``; blanks for what is missing. ``paper`` False (a sweep's
    table): kdrun's part alone."""
    kd = kdrun_text(cell, latex)
    if not paper:
        return kd.replace(BLANK, "--") if latex else kd
    delta = _f(cell.delta, signed=True)
    if latex:
        delta = delta.replace("-", "$-$") if delta != BLANK else "--"
        return f"{_f(cell.paper).replace(BLANK, '--')} / {kd.replace(BLANK, '--')} / {delta}"
    return f"{_f(cell.paper)} / {kd} / {delta}"


def paired_text(p: Paired | None, latex: bool = False) -> str:
    """``+0.30 [-0.20, +0.80] (n=3)``: the mean per-seed difference to the baseline, its 95 % interval
    (``[n/a]`` with one common seed) and the number of common seeds; ``baseline`` for the baseline itself."""
    if p is None:
        text = BLANK
    elif p.baseline:
        text = "baseline"
    elif p.mean is None:
        text = f"{BLANK} (no common seed)"
    else:
        ci = f"[{p.ci[0]:+.2f}, {p.ci[1]:+.2f}]" if p.ci is not None else "[n/a]"
        text = f"{p.mean:+.2f} {ci} (n={p.n})"
    return text.replace("-", "$-$").replace(BLANK, "--") if latex else text


Cells = dict[str, dict[tuple[str, str], Cell]]  # metric key -> (row, column) -> cell
PairedCells = dict[str, dict[tuple[str, str], Paired | None]]  # metric key -> (row, column) -> difference


def _what(table: TableDef) -> str:
    ms = table.metrics
    if len(ms) == 1 and ms[0].scale == 1.0:
        return ms[0].label
    scale = {m.scale for m in ms}
    s = f" (results.json value x {scale.pop():g})" if len(scale) == 1 else " (scaled per metric)"
    return ", ".join(m.label for m in ms) + s


def _seed_list(seeds: Iterable[int | None]) -> str:
    return ", ".join("none" if s is None else str(s) for s in sorted(set(seeds), key=lambda s: (s is None, s)))


@dataclass(frozen=True)
class Legend:
    title: str
    note: str   # what the cells show: metric and its convention, seeds, run counts
    seeds: str  # the seeds counted ("0, 1, 2" or "all")
    baseline: str = ""  # the line the paired differences compare with ("row KD"), "" for none


STATS_NOTE = ("[a, b] = 95 % confidence interval of the mean (Student's t with n − 1 degrees of freedom: "
              "mean ± t·s/√n; n/a for n < 2)")


def _baseline_label(table: TableDef, baseline: tuple[str, str] | None) -> str:
    if baseline is None:
        return ""
    kind, ident = baseline
    line = next(x for x in (table.rows if kind == "row" else table.columns) if x.id == ident)
    return line.label if not table.from_paper else f"{kind} {line.label}"


def paired_note(table: TableDef, baseline: tuple[str, str] | None) -> str:
    """The sentence that says how the paired differences are made."""
    if baseline is None:
        return ""
    same = "column" if baseline[0] == "row" else "row"
    return (f" Δ vs {_baseline_label(table, baseline)}: for each seed s that a cell and the baseline's cell of "
            f"the same {same} both ran, d_s = cell_s − baseline_s (same seed = same initialisation and data "
            f"order); mean of d [95 % t-interval of d] (n = common seeds), a paired t-test: an interval that "
            f"excludes 0 is more than seed noise at the 5 % level.")


def legend(table: TableDef, metric: str, n_runs: int, seeds: tuple[int, ...] | None = None,
           left_out: Sequence[Run] = (), seeds_given: bool = False,
           baseline: tuple[str, str] | None = None) -> Legend:
    """The title and the note printed above a table."""
    when, paren = METRICS[metric]
    if seeds is None:
        seed_txt = "seeds: every run" + (" (--seeds all)" if seeds_given else
                                         " (this table declares none)" if table.from_paper else "")
    else:
        how = "--seeds" if seeds_given else "declared by this table" + (
            f": {table.seeds_source}" if table.seeds_source else "")
        seed_txt = f"seeds: {_seed_list(seeds)} ({how})"
    if left_out:
        seed_txt += (f"; {len(left_out)} run(s) of other seeds ({_seed_list(r.seed for r in left_out)}) "
                     f"left out, --seeds all counts them")
    if table.from_paper:
        src = f" ({table.convention_source})" if table.convention_source else ""
        if metric == table.convention:
            conv = f"the paper's convention{src}"
        else:
            conv = f"--metric {metric}, NOT the paper's convention: it reports {table.convention}{src}"
        what = f"metric: kdrun {when} {_what(table)} {paren}, {conv}; paper: {table.metric}."
        cell = "paper / kdrun mean ± std over seeds (n runs) [95 % CI] / Δ = kdrun − paper"
    else:
        other = "best" if metric == "final" else "final"
        what = f"metric: {when} {_what(table)} {paren} (--metric {other} for the other). {table.note}"
        cell = "mean ± std over seeds (n runs) [95 % CI]"
    note = (f"{what} {seed_txt}. Cell: {cell}; {STATS_NOTE}; {BLANK} = none."
            f"{paired_note(table, baseline)} {n_runs} run(s) matched this table.")
    return Legend(table.title, note, ALL if seeds is None else _seed_list(seeds), _baseline_label(table, baseline))


def _layout(table: TableDef) -> tuple[list[str], list[tuple[str, Line, Line | None]]]:
    """Header labels and body lines ``(label, row, column)`` of the printed table. One metric: rows ×
    columns as defined. Several metrics (the papers' detection layout): one block of rows per column,
    a line per (column, row), the metrics across."""
    if len(table.metrics) == 1:
        return [c.label for c in table.columns], [(r.label, r, None) for r in table.rows]
    return ([m.label for m in table.metrics],
            [(f"{c.label}: {r.label}", r, c) for c in table.columns for r in table.rows])


def _line_cells(table: TableDef, cells: dict[str, dict[tuple[str, str], Any]], r: Line, c: Line | None) -> list[Any]:
    if c is None:  # one metric: the row across the columns
        k = table.metrics[0].key
        return [cells[k][(r.id, col.id)] for col in table.columns]
    return [cells[m.key][(r.id, c.id)] for m in table.metrics]  # several: (row, column) across the metrics


def _has_paired(paired: PairedCells | None) -> bool:
    # Only a table with at least one pair of runs shows differences (a table without runs stays the paper's).
    return bool(paired) and any(p is not None and p.n > 0 for d in paired.values() for p in d.values())


def _one_cell(table: TableDef) -> bool:
    # A table of one column and one metric (a sweep's): the difference fits as a second column.
    return len(table.columns) == 1 and len(table.metrics) == 1


def render_markdown(table: TableDef, cells: Cells, metric: str, info: Legend, paired: PairedCells | None = None
                    ) -> str:
    title, note = info.title, info.note
    header, body = _layout(table)
    beside = _has_paired(paired) and _one_cell(table)
    extra = [f"Δ vs {info.baseline} (paired by seed) [95 % CI]"] if beside else []
    lines = [f"**{title}**", "", note, ""]
    lines.append("| | " + " | ".join(header + extra) + " |")
    lines.append("|---" * (len(header) + len(extra) + 1) + "|")
    for label, r, c in body:
        label += " *(paper only)*" if r.reference else ""
        texts = [cell_text(x, paper=table.from_paper) for x in _line_cells(table, cells, r, c)]
        if beside:
            texts += [paired_text(x) for x in _line_cells(table, paired, r, c)]  # type: ignore[arg-type]
        lines.append(f"| {label} | " + " | ".join(texts) + " |")
    if _has_paired(paired) and not beside:
        lines += ["", f"**Paired difference to {info.baseline}** (by seed): mean [95 % CI] (n common seeds)", "",
                  "| | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
        for label, r, c in body:
            if r.reference:
                continue
            lines.append(f"| {label} | " + " | ".join(paired_text(x) for x in _line_cells(table, paired, r, c))
                         + " |")
    return "\n".join(lines) + "\n"


def _tex(s: str) -> str:
    return (s.replace("\\", r"\textbackslash{}").replace("&", r"\&").replace("%", r"\%").replace("_", r"\_")
            .replace("#", r"\#").replace("->", r"$\to$").replace("Δ", r"$\Delta$").replace("±", r"$\pm$")
            .replace("—", "--").replace("−", "$-$"))


def _latex_body(table: TableDef, header: list[str], body: list[tuple[str, Line, Line | None]],
                text: Any, skip_reference: bool = False) -> list[str]:
    lines = [r"\begin{tabular}{l" + "c" * len(header) + "}", r"\toprule",
             " & ".join(["Method", *(_tex(h) for h in header)]) + r" \\", r"\midrule"]
    previous = None
    for label, r, c in body:
        if skip_reference and r.reference:
            continue
        if len(table.metrics) > 1:  # a block per column, headed by its label (the papers' detection layout)
            if c is not previous:
                if previous is not None:
                    lines.append(r"\midrule")
                lines.append(rf"\multicolumn{{{len(header) + 1}}}{{l}}{{\emph{{{_tex(c.label)}}}}} \\")
            label, previous = r.label, c
        label = _tex(label) + (r"$^\dagger$" if r.reference else "")
        lines.append(" & ".join([label, *text(r, c)]) + r" \\")
    return lines + [r"\bottomrule", r"\end{tabular}"]


def render_latex(table: TableDef, cells: Cells, metric: str, info: Legend, paired: PairedCells | None = None) -> str:
    title, note = info.title, info.note
    header, body = _layout(table)
    beside = _has_paired(paired) and _one_cell(table)

    def text(r: Line, c: Line | None) -> list[str]:
        out = [cell_text(x, latex=True, paper=table.from_paper) for x in _line_cells(table, cells, r, c)]
        return out + ([paired_text(x, latex=True) for x in _line_cells(table, paired, r, c)]  # type: ignore[arg-type]
                      if beside else [])

    extra = [f"Δ vs {info.baseline} [95 % CI]"] if beside else []
    what = "paper / kdrun mean $\\pm$ std (n) [95\\,\\% CI] / $\\Delta$" if table.from_paper else \
        "mean $\\pm$ std (n) [95\\,\\% CI]"
    lines = [f"% {title}", f"% {note}", *_latex_body(table, header + extra, body, text),
             rf"% cell: {what}; $^\dagger$ paper-only row"]
    if _has_paired(paired) and not beside:
        lines += [f"% Paired difference to {info.baseline} (by seed): mean [95 % CI] (n common seeds)",
                  *_latex_body(table, header, body, lambda r, c: [paired_text(x, latex=True) for x in
                                                                  _line_cells(table, paired, r, c)],  # type: ignore
                               skip_reference=True)]
    return "\n".join(lines) + "\n"


def _num(v: float | None, fmt: str = ".4f") -> str:
    return "" if v is None else format(v, fmt)


def render_csv(table: TableDef, cells: Cells, metric: str, info: Legend, paired: PairedCells | None = None) -> str:
    """One line per (row, column, metric key); ``key`` is the results.json key, values already scaled;
    ``metric`` is final|best, ``convention`` the paper's, ``seeds`` the seeds that were counted;
    ``ci_low``/``ci_high`` the 95 % t-interval of the mean; ``baseline`` the line the paired differences
    compare with, ``diff_*`` the paired difference to it (``diff_n`` common seeds)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["table", "metric", "convention", "seeds", "row", "row_label", "column", "column_label", "key",
                "paper", "kdrun_mean", "kdrun_std", "n", "delta", "source", "ci_low", "ci_high", "baseline",
                "diff_mean", "diff_ci_low", "diff_ci_high", "diff_n"])
    for r in table.rows:
        for c in table.columns:
            for m in table.metrics:
                cell = cells[m.key][(r.id, c.id)]
                p = (paired or {}).get(m.key, {}).get((r.id, c.id))
                diff = ["", "", "", ""] if p is None or p.baseline else \
                    [_num(p.mean), _num(p.ci[0] if p.ci else None), _num(p.ci[1] if p.ci else None), p.n]
                w.writerow([table.name, metric, table.convention if table.from_paper else "", info.seeds, r.id,
                            r.label, c.id, c.label, m.key, _num(cell.paper, ".2f"), _num(cell.mean),
                            _num(cell.std), cell.n, _num(cell.delta), table.number_sources.get((r.id, c.id, m.key), ""),
                            _num(cell.ci[0] if cell.ci else None), _num(cell.ci[1] if cell.ci else None),
                            info.baseline if p is not None else "", *diff])
    return buf.getvalue()


RENDERERS = {"markdown": render_markdown, "latex": render_latex, "csv": render_csv}


def counted_runs(table: TableDef, runs: list[Run], seeds: Sequence[int] | str | None = None,
                 duplicates: str = "error") -> tuple[list[Run], list[Run], tuple[int, ...] | None, list[str]]:
    """:func:`select_seeds`, then :func:`resolve_duplicates` on the runs that count (a duplicate of a seed
    the table leaves out changes nothing): (counted, left out, seeds used, lines on duplicates dropped)."""
    kept, left_out, used = select_seeds(table, runs, seeds)
    kept, notes = resolve_duplicates(table, kept, duplicates)
    return kept, left_out, used, notes


def render(table: TableDef, runs: list[Run], metric: str | None = None, fmt: str = "markdown",
           seeds: Sequence[int] | str | None = None, duplicates: str = "error", baseline: str | None = None) -> str:
    """The whole table as text, from the runs (already loaded) and a definition. ``metric`` None = the
    table's convention; ``seeds`` None = the table's declared seeds, ``"all"`` = every run; ``duplicates``:
    :func:`resolve_duplicates`' policy; ``baseline``: :func:`resolve_baseline`'s name (None: the default)."""
    metric = table.convention if metric is None else metric
    if metric not in METRICS:
        raise TableError(f"--metric {metric!r}: choose one of {', '.join(METRICS)}")
    if fmt not in RENDERERS:
        raise TableError(f"--format {fmt!r}: choose one of {', '.join(RENDERERS)}")
    base = resolve_baseline(table, baseline)
    kept, left_out, used, dropped = counted_runs(table, runs, seeds, duplicates)
    cells = {m.key: build_cells(table, kept, metric, m.key) for m in table.metrics}
    paired = {m.key: build_paired(table, kept, metric, m.key, base) for m in table.metrics}
    note = legend(table, metric, len(kept), used, left_out, seeds_given=seeds is not None,
                  baseline=base if _has_paired(paired) else None)
    if dropped:
        note = Legend(note.title, note.note + f" {len(dropped)} duplicate run(s) of a counted seed left out "
                      f"(--duplicates {duplicates}).", note.seeds, note.baseline)
    return RENDERERS[fmt](table, cells, metric, note, paired if note.baseline else None)


def parse_seeds(text: str | None) -> Sequence[int] | str | None:
    """``--seeds``: None (the table's), ``all``, or a comma-separated list of integers."""
    if text is None or text == ALL:
        return text
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        out = []
    if not out:
        raise TableError(f"--seeds {text!r}: give 'all' or comma-separated integers, e.g. 0,1,2")
    return out


def unplaced(table: TableDef, runs: list[Run]) -> list[Run]:
    """Runs that name this table but a row/column it does not have (a typo or a stale recipe)."""
    rows, cols = {r.id for r in table.rows}, {c.id for c in table.columns}
    return [run for run in runs for t, r, c in run.cells if t == table.name and (r not in rows or c not in cols)]


# ---------------------------------------------------------------------------------------------------
# A sweep's table: one row per setting of what the runs vary.

SWEEP = "sweep"


def _primary(runs: list[Run]) -> Metric:
    """The runs' primary metric (results.json ``primary_metric``; the most common one): top-1 as it is,
    COCO's AP × 100 (pycocotools gives 0..1, as the detection tables print it)."""
    keys = [r.results.get("primary_metric") for r in runs if isinstance(r.results.get("primary_metric"), str)]
    key = max(set(keys), key=keys.count) if keys else "top1"
    if key == "top1":
        return Metric("top1", "top-1 (%)", 1.0)
    return Metric(key, f"{key} (x100)", 100.0) if key.startswith("AP") else Metric(key, key, 1.0)


def sweep_table(runs: list[Run], by: list[str] | None = None) -> tuple[TableDef, list[Run]]:
    """A table of ``runs`` as one sweep (:func:`kdrun.analysis.sweep.group_runs`: the override keys whose values
    differ between the runs; seeds are the replicates) of the runs' primary metric. Rows: one per setting
    of the swept keys, or of the keys ``by``; the swept keys not in ``by`` then make the columns (``--by
    balancer`` on a balancer × distill sweep: a row per balancer, a column per distill), so that a cell
    never mixes settings. Returns the table and the runs, each placed in its cell."""
    from kdrun.analysis.sweep import SweepError, group_runs

    paths = [r.path for r in runs]
    try:
        full = group_runs(paths)
        rows_sweep = group_runs(paths, by)
    except SweepError as e:
        raise TableError(str(e)) from None
    col_keys = [k for k in full.keys if k not in rows_sweep.keys]
    cols_sweep = group_runs(paths, col_keys) if col_keys else None
    metric = _primary(runs)

    def lines(groups: list[Any]) -> tuple[list[Line], dict[Path, str]]:
        out: list[Line] = []
        of: dict[Path, str] = {}
        for g in groups:
            ident = g.label if all(g.label != x.id for x in out) else f"{g.label} ({len(out)})"
            out.append(Line(ident, ident))
            of.update((p, ident) for p in g.runs)
        return out, of

    rows, row_of = lines(rows_sweep.groups)
    if cols_sweep is None:
        columns, col_of = [Line("value", metric.label)], {p: "value" for p in paths}
    else:
        columns, col_of = lines(cols_sweep.groups)
    grouped = " × ".join(rows_sweep.keys + col_keys)
    shared = full.shared_label
    title = (f"Sweep of {grouped}" if grouped else "Runs") + (f": {shared}" if shared else "")
    if by is not None:
        how = f"rows by {', '.join(by)} (--by)" + (f", columns by {', '.join(col_keys)}" if col_keys else "")
    elif full.source == "overrides":
        how = (f"a row per setting of {grouped} (what differs between the runs' overrides)"
               if grouped else "one row: no setting but the seed differs between the runs")
    else:
        how = (f"a row per {grouped} (what differs between the runs' saved configs; no .hydra/overrides.yaml)"
               if grouped else "one row: no fact but the seed differs between the runs")
    note = (f"Rows: {how}; seeds (seed, trainer.seed) are the replicates"
            + (f"; shared by every run: {shared}." if shared else "."))
    table = TableDef(SWEEP, title, metric.label, rows, columns, [metric], convention="final", seeds=None,
                     from_paper=False, note=note)
    placed = [Run(r.path, r.results, r.dropped, ((SWEEP, row_of[r.path], col_of[r.path]),)) for r in runs]
    return table, placed


# ---------------------------------------------------------------------------------------------------
# Command line.


def main(argv: list[str] | None = None) -> int:
    """``kdrun tables``; returns the exit status (0 ok, 2 bad usage)."""
    p = argparse.ArgumentParser(prog="kdrun tables", description="Lay results.json files out as the papers' "
                                "tables (--table: paper number / kdrun mean ± std (n seeds) [95 percent CI] / delta "
                                "per "
                                "cell), or, without --table, as a sweep: one row per setting of what the runs "
                                "vary; each with its paired difference to a baseline row by seed.")
    p.add_argument("runs", nargs="+", metavar="RUNS_DIR", help="directories searched recursively for results.json")
    p.add_argument("--table", default=None, help="table name (imagenet, cifar100, cifar100_dynamic, "
                   "cifar100_dynamic_mtl, coco, coco_teachers, coco_ablation_dto_kd, coco_ablation_mokd, or one of "
                   "--definitions). Without it: the runs as a sweep")
    p.add_argument("--by", default=None, help="sweep (no --table): comma-separated override keys that make the "
                   "rows, e.g. balancer; the other swept keys then make the columns (default: a row per setting "
                   "of every key whose value differs between the runs; seed and trainer.seed are the replicates)")
    p.add_argument("--baseline", default=None, help="the row (or column) every cell is compared with, paired by "
                   "seed, by id or label; 'none' for no comparison. Default: the row kd of a paper table, the "
                   "first row of a sweep")
    p.add_argument("--metric", default=None, choices=sorted(METRICS), help="final: the last epoch's values; "
                   "best: the values of the epoch with the best primary metric (top-1 or AP). Default: the "
                   "table's paper convention (CIFAR/ImageNet best, COCO final); final for a sweep")
    p.add_argument("--seeds", default=None, help="'all' or comma-separated seeds to count (default: the seeds the "
                   "table declares, e.g. 0,1,2 for cifar100 and 0-4 for the cross-batch tables; all for a sweep)")
    p.add_argument("--duplicates", default="error", choices=DUPLICATES, help="two runs of one cell with the same "
                   "seed: error (default; names both directories), or count only the newest/oldest results.json")
    p.add_argument("--format", default="markdown", choices=sorted(RENDERERS))
    p.add_argument("--definitions", default=None, help="table definitions YAML (default: kdrun/analysis/paper_numbers.yaml)")
    a = p.parse_args(argv)
    try:
        missing = [d for d in a.runs if not Path(d).exists()]
        if a.table is not None:
            if a.by is not None:
                raise TableError("--by groups the rows of a sweep's table; a paper table (--table) has its rows "
                                 "from the recipes. Drop --table to table the runs as a sweep, or drop --by")
            defs = load_definitions(a.definitions)
            if a.table not in defs:
                raise TableError(f"unknown table {a.table!r}; valid tables are {', '.join(defs)}")
        if missing:
            raise TableError(f"no such directory: {', '.join(missing)}")
        runs = find_runs(a.runs)
        if a.table is None:
            if not runs:
                raise TableError(f"no usable results.json under {', '.join(a.runs)}, so there is no sweep to table "
                                 "(a run writes it when it finishes); pass the sweep's directory, or --table NAME "
                                 "for a paper table")
            by = [k.strip() for k in a.by.split(",") if k.strip()] if a.by is not None else None
            if by is not None and not by:
                raise TableError(f"--by {a.by!r}: give comma-separated override keys, e.g. --by balancer")
            table, runs = sweep_table(runs, by)
        else:
            table = defs[a.table]
        text = render(table, runs, a.metric, a.format, parse_seeds(a.seeds), a.duplicates, a.baseline)
    except TableError as e:
        print(f"kdrun tables: error: {e}", file=sys.stderr)
        return 2
    kept, _, _, dropped = counted_runs(table, runs, parse_seeds(a.seeds), a.duplicates)
    for line in dropped:
        print(f"kdrun tables: {line}", file=sys.stderr)
    for line in blank_reasons(table, kept, table.convention if a.metric is None else a.metric):
        print(f"kdrun tables: {line}", file=sys.stderr)
    if a.table is None:
        sys.stdout.write(text)
        return 0
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
