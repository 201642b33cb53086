"""Prefect flow over a grid of DVC experiments, ending in one comparison table.

    python -m flows.sweep --grid sweeps/paper_tables.yaml [--repo .] [--jobs 1] [--tables table_iv,table_vii]
                          [--out DIR] [--dry-run]

Each grid point is queued as ``dvc exp run --queue --name <grid>-<table>-<NN> -S key=value ...``
(isolated temp workspaces; unchanged upstream stages come from the DVC run-cache; experiments of an
earlier sweep with the same names are removed first, not overwritten with ``--force``, which would
rerun every stage), the queue is run with
``dvc queue start -j N`` and watched until every experiment of the sweep has finished, and
``dvc exp show --json`` is turned into one comparison table: ``comparison.md`` (one table per paper
table), ``comparison.csv`` (one row per experiment) and a Prefect table artifact ``sweep-<grid>``.

Grid file (YAML)::

    name: paper                      # experiment names and the output folder
    jobs: 1                          # queue workers (parallel experiments)
    metrics:                         # column -> [metrics file:]dotted key (default: the registry's
                                     # headline, amrg.metrics.registry.HEADLINE, of the model)
      BLEU-4: model.BLEU_4
    tables:
      table_vii:
        title: Hopfield beta
        grid: {hopfield.beta: [1.0, 4.0]}           # the cartesian product of the lists ...
        points: [{hopfield.visual: false}]          # ... and/or explicit points
        set: {decode.num_beams: 1}                  # overrides shared by every point of the table
      reproduce:
        title: One configuration over five seeds
        seeds: [0, 1, 2, 3, 4]                      # `runtime.seed` values (or `seeds: 5` for 0..4)
        set: {hopfield.beta: 4.0}                   # no grid/points: one configuration (params.yaml + set)

A table with ``seeds:`` runs each of its points (with no ``grid``/``points``: the one configuration of
params.yaml plus ``set``) once per seed, ``-S runtime.seed=<seed>``, as ``<grid>-<table>-s<seed>``
(``<grid>-<table>-<NN>-s<seed>`` when it has several points). Its comparison has one row per seed run
and system (the model and every baseline of the evaluate metrics file, each with the paired 95%
bootstrap CI of that run) and, per point and system, a row ``mean ± sd over N seeds``: the mean and the
sample standard deviation (n - 1) across the successful seed runs (:func:`seed_summary`). A metric
column ``[file:]model.KEY`` reads ``baselines.<name>.KEY`` for a baseline; other columns are the
model's only. ``runtime.seed`` may not be set otherwise in such a table (grid, points or set).

A point may carry a ``label`` (the system's name in the table): it is not a params key and never passed
as ``-S``; labels go in ``points:`` only (not ``set``/``grid``). ``format: cxpmrg`` renders a
CXPMRG-Bench-style table instead (seed 002 Tables 1-2: BLEU-1..4, ROUGE-L, METEOR, CIDEr, CE P/R/F1,
test-set generation minutes, trainable and total parameters, device; :data:`CXPMRG_COLUMNS`, whose specs
``metrics:`` may override by column name), and ``reference: <csv>`` (relative to the repository) adds the
published rows of that file in a separate block, "published, not rerun", each group with its protocol
(:func:`load_reference`); they are never mixed with measured rows. ``sweeps/cxpmrg_bench.yaml`` is such a grid.

Before anything is queued, every grid point is validated as the pipeline validates an overlay: its
keys must be in the repository's params.yaml, and params.yaml with the point applied must pass
:func:`amrg.config.parse_params` (types, ranges, unknown keys). ``comparison.md``/``.csv`` are written
atomically.
"""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import argparse  # noqa: E402
import csv  # noqa: E402
import io  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import yaml  # noqa: E402
from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from amrg.config import ParamsError, get_dotted  # noqa: E402
from amrg.layout import Layout  # noqa: E402
from amrg.io import write_text  # noqa: E402
from amrg.metrics import registry  # noqa: E402
from flows.dvc_tasks import remove_experiments, run_dvc, set_args, validate_overlay  # noqa: E402

EVAL_METRICS = (Layout().stage_dir("evaluate") / "metrics.json").as_posix()
GENERATOR_METRICS = (Layout().stage_dir("train_generator") / "metrics.json").as_posix()
HEADLINE = {registry.label(k): f"model.{k}" for k in registry.HEADLINE}  # column -> dotted key
DONE = {"Success", "Failed"}
SEED_KEY = "runtime.seed"
AGGREGATE = "aggregate"  # state of a `mean ± sd over N seeds` row
LABEL = "label"  # a point's system name: not a params key, never passed as -S
DEFAULT_FORMAT, CXPMRG = "default", "cxpmrg"
GRID_FIELDS = {"name", "jobs", "metrics", "tables", "format", "reference"}
MISSING = "—"  # a cxpmrg cell whose metric the run did not write


@dataclass(frozen=True)
class BenchColumn:
    """One metric column of the CXPMRG-Bench table (seed 002 Tables 1-2): its ``[file:]dotted`` spec in
    the run's metrics files, the column of the published CSV it lines up with (None: not published in that
    form), and how a measured value prints (``score`` 3 decimals as the paper, ``minutes`` 2, ``count`` in
    millions, ``text`` as it is)."""

    label: str
    spec: str
    reference: str | None
    kind: str


CXPMRG_COLUMNS: tuple[BenchColumn, ...] = (
    *(BenchColumn(f"BLEU-{n}", f"model.BLEU_{n}", f"B{n}", "score") for n in range(1, 5)),
    BenchColumn("ROUGE-L", "model.ROUGE_L", "R", "score"),
    BenchColumn("METEOR", "model.METEOR", "M", "score"),
    BenchColumn("CIDEr", "model.CIDEr", "C", "score"),
    BenchColumn("CE P", "model.ce.precision", "CE_P", "score"),
    BenchColumn("CE R", "model.ce.recall", "CE_R", "score"),
    BenchColumn("CE F1", "model.ce.f1", "CE_F1", "score"),
    BenchColumn("Time (min)", "generation.minutes", "time_min", "minutes"),  # evaluate: test-set generation
    BenchColumn("Trainable params", f"{GENERATOR_METRICS}:trainable_parameters", None, "count"),
    BenchColumn("Total params", f"{GENERATOR_METRICS}:total_parameters", None, "count"),
    BenchColumn("Device", "generation.device", None, "text"),
)
CXPMRG_METRICS = {c.label: c.spec for c in CXPMRG_COLUMNS}
# the published CSV: identification, the metric columns of CXPMRG_COLUMNS, then time, size and protocol
REFERENCE_FIELDS = ("table", "index", "system", "venue", "encoder", "decoder",
                    *(c.reference for c in CXPMRG_COLUMNS if c.reference), "params", "params_meaning", "protocol")


class SweepError(RuntimeError):
    pass


class SweepConfigError(SweepError):
    """The grid or one of its points is invalid; nothing was queued."""


@dataclass
class Grid:
    name: str
    tables: dict[str, list[dict[str, Any]]]  # table -> points (key -> value)
    titles: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, str] = field(default_factory=lambda: dict(HEADLINE))
    jobs: int = 1
    seeds: dict[str, list[int]] = field(default_factory=dict)  # seed table -> its runtime.seed values
    labels: dict[str, list[str | None]] = field(default_factory=dict)  # table -> each point's label (or None)
    format: str = DEFAULT_FORMAT
    reference: str | None = None  # published rows (CSV, relative to the repository)

    def _expanded(self) -> list[tuple[str, str, dict[str, Any], str | None]]:
        """(experiment name, table, point, label) in grid order; a seed table's points carry ``runtime.seed``."""
        out = []
        for table, points in self.tables.items():
            seeds = self.seeds.get(table)
            labels = self.labels.get(table) or [None] * len(points)
            for i, (point, label) in enumerate(zip(points, labels), 1):
                if seeds is None:
                    out.append((f"{self.name}-{table}-{i:02d}".replace("_", "-"), table, point, label))
                    continue
                stem = f"{self.name}-{table}" + (f"-{i:02d}" if len(points) > 1 else "")
                out += [(f"{stem}-s{s}".replace("_", "-"), table, {**point, SEED_KEY: s}, label) for s in seeds]
        return out

    def experiments(self) -> list[tuple[str, str, dict[str, Any]]]:
        """(experiment name, table, point) in grid order; a seed table's points carry ``runtime.seed``."""
        return [(name, table, point) for name, table, point, _ in self._expanded()]

    def experiment_labels(self) -> dict[str, str]:
        """Experiment name -> its point's ``label`` (points without one are left out)."""
        return {name: label for name, _, _, label in self._expanded() if label is not None}

    def seed_groups(self, table: str) -> list[tuple[dict[str, Any], list[tuple[str, int]]]]:
        """A seed table's points (without the seed), each with its ``[(experiment, seed), ...]``."""
        groups: dict[str, tuple[dict[str, Any], list[tuple[str, int]]]] = {}
        for name, t, point in self.experiments():
            if t == table:
                config = {k: v for k, v in point.items() if k != SEED_KEY}
                groups.setdefault(json.dumps(config, sort_keys=True, default=str), (config, []))[1].append(
                    (name, point[SEED_KEY]))
        return list(groups.values())


def _seeds(table: str, spec: dict[str, Any]) -> list[int] | None:
    raw = spec.get("seeds")
    if raw is None:
        return None
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = list(range(raw))
    if not isinstance(raw, list) or not raw or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                       for s in raw):
        raise SweepConfigError(f"table {table}: `seeds` must be a non-empty list of integers >= 0 (or a count)")
    if len(set(raw)) != len(raw):
        raise SweepConfigError(f"table {table}: repeated seed(s) in {raw}")
    if SEED_KEY in (spec.get("set") or {}) or SEED_KEY in (spec.get("grid") or {}) or any(
            SEED_KEY in (p or {}) for p in spec.get("points") or []):
        raise SweepConfigError(f"table {table}: {SEED_KEY} is given by `seeds`, not by grid/points/set")
    return list(raw)


def _point_label(table: str, point: dict[str, Any]) -> str | None:
    """Pop a point's ``label`` (a non-empty string): the system's name in the table, not a params key."""
    label = point.pop(LABEL, None)
    if label is not None and (not isinstance(label, str) or not label.strip()):
        raise SweepConfigError(f"table {table}: a point's `{LABEL}` must be a non-empty string (got {label!r})")
    return label


def _metrics(raw: dict[str, Any], fmt: str) -> dict[str, str]:
    """The grid's metric columns: ``metrics:`` or the registry's headline; under ``format: cxpmrg`` the
    fixed :data:`CXPMRG_COLUMNS`, whose specs ``metrics:`` may override by column name."""
    given = dict(raw.get("metrics") or {})
    if fmt != CXPMRG:
        return given or dict(HEADLINE)
    if unknown := sorted(set(given) - set(CXPMRG_METRICS)):
        raise SweepConfigError(f"format {CXPMRG}: unknown metric column(s) {unknown} "
                               f"(the table's columns: {list(CXPMRG_METRICS)})")
    return {**CXPMRG_METRICS, **given}


def load_grid(path: str | Path, only: list[str] | None = None) -> Grid:
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SweepConfigError(f"grid {path}: {exc}") from exc
    if unknown := sorted(set(raw) - GRID_FIELDS):
        raise SweepConfigError(f"grid {path}: unknown fields {unknown} (allowed: {', '.join(sorted(GRID_FIELDS))})")
    name = str(raw.get("name") or Path(path).stem)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
        raise SweepConfigError(f"grid name {name!r}: letters, digits, '-' and '_' only (it names git refs)")
    fmt = str(raw.get("format") or DEFAULT_FORMAT)
    if fmt not in (DEFAULT_FORMAT, CXPMRG):
        raise SweepConfigError(f"grid {path}: format {fmt!r} is not one of {[DEFAULT_FORMAT, CXPMRG]}")
    reference = raw.get("reference")
    if reference is not None and (not isinstance(reference, str) or not reference):
        raise SweepConfigError(f"grid {path}: reference must be a CSV path (got {reference!r})")
    tables, titles, seed_lists, labels = {}, {}, {}, {}
    for table, spec in (raw.get("tables") or {}).items():
        if only and table not in only:
            continue
        spec = spec or {}
        unknown = set(spec) - {"title", "grid", "points", "set", "seeds"}
        if unknown:
            raise SweepConfigError(f"table {table}: unknown fields {sorted(unknown)} "
                                   "(allowed: title, grid, points, set, seeds)")
        seeds = _seeds(table, spec)
        if seeds is not None and fmt == CXPMRG:
            raise SweepConfigError(f"table {table}: format {CXPMRG} has one row per point; `seeds:` tables "
                                   "render in the default format")
        shared = spec.get("set") or {}
        grid = spec.get("grid") or {}
        if LABEL in shared or LABEL in grid:
            raise SweepConfigError(f"table {table}: `{LABEL}` names one point: give it in `points:`, not in set/grid")
        points = [dict(p or {}) for p in spec.get("points") or []]
        point_labels = [_point_label(table, p) for p in points]
        if grid:
            keys = list(grid)
            combos = [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]
            points += combos
            point_labels += [None] * len(combos)
        if not points and seeds is not None:
            points, point_labels = [{}], [None]  # a seed table without grid/points: params.yaml + set
        if not points:
            raise SweepConfigError(f"table {table}: no points (give `grid:` lists and/or `points:`, or `seeds:`)")
        tables[table] = [{**shared, **p} for p in points]
        titles[table] = str(spec.get("title", table))
        if any(label is not None for label in point_labels):
            labels[table] = point_labels
        if seeds is not None:
            seed_lists[table] = seeds
    if only and (missing := sorted(set(only) - set(tables))):
        raise SweepConfigError(f"unknown table(s) {missing}; the grid has {sorted((raw.get('tables') or {}))}")
    if not tables:
        raise SweepConfigError(f"{path}: no tables")
    return Grid(name, tables, titles, _metrics(raw, fmt), int(raw.get("jobs", 1)), seed_lists, labels, fmt, reference)


def load_reference(path: str | Path) -> list[dict[str, str]]:
    """The published rows of a ``reference:`` CSV (columns :data:`REFERENCE_FIELDS`; an empty cell: not
    reported). Every row must name its ``protocol`` (how its numbers were made), as it is shown with them."""
    try:
        with Path(path).open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = reader.fieldnames or []
    except OSError as exc:
        raise SweepConfigError(f"reference {path}: {exc}") from exc
    if missing := [c for c in REFERENCE_FIELDS if c not in header]:
        raise SweepConfigError(f"reference {path}: missing column(s) {missing} (expected {list(REFERENCE_FIELDS)})")
    if unnamed := [i for i, r in enumerate(rows, 2) if not (r.get("protocol") or "").strip()]:
        raise SweepConfigError(f"reference {path}: line(s) {unnamed} name no protocol")
    return rows


def reference_rows(grid: Grid, repo: str | Path) -> list[dict[str, str]]:
    """The grid's published rows (``reference:``, relative to ``repo``); [] without a reference."""
    if grid.reference is None:
        return []
    path = Path(grid.reference)
    return load_reference(path if path.is_absolute() else Path(repo) / path)


def validate_points(grid: Grid, params_yaml: Path) -> None:
    """Every point must be a valid overlay of params.yaml (:func:`flows.dvc_tasks.validate_overlay`, the
    pipeline's check): keys already in params.yaml (``-S`` only overrides) and the merged params valid
    for :func:`amrg.config.parse_params`, so ``hopfield.beta: -1`` fails here, not in a queue worker."""
    try:
        params = yaml.safe_load(params_yaml.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SweepConfigError(f"{params_yaml}: {exc}") from exc
    bad = []
    for name, _, point in grid.experiments():
        try:
            validate_overlay(params, point, str(params_yaml))
        except ParamsError as exc:
            bad.append(f"{name} {point}: {exc}")
    if bad:
        raise SweepConfigError("invalid grid point(s):\n" + "\n".join(bad))


def prepare(grid: str | Path, repo: str | Path, tables: list[str] | None = None) -> tuple[Grid, list[dict[str, str]]]:
    """The one validation before anything is queued: the grid (:func:`load_grid`), every point against
    ``<repo>/params.yaml`` (:func:`validate_points`) and the published rows (:func:`reference_rows`)."""
    g = load_grid(grid, tables)
    validate_points(g, Path(repo) / "params.yaml")
    return g, reference_rows(g, repo)


def queue_command(name: str, point: dict[str, Any]) -> str:
    """The shell form of one queued experiment: ``dvc exp run --queue --name <name> -S key=value ...``
    (a point's ``label`` is not in ``point``: it never reaches DVC)."""
    return shlex.join(["dvc", "exp", "run", "--queue", "--name", name, *set_args(point)])


def parse_queue_status(text: str) -> tuple[dict[str, str], tuple[int, int]]:
    """``dvc queue status`` -> ({experiment name: status}, (active workers, idle workers)); a name queued
    again keeps its latest row (DVC lists newest first)."""
    status: dict[str, str] = {}
    workers = (0, 0)
    for line in text.splitlines():
        if m := re.search(r"Worker status:\s*(\d+) active,\s*(\d+) idle", line):
            workers = (int(m.group(1)), int(m.group(2)))
            continue
        parts = line.split()
        if len(parts) >= 4 and re.fullmatch(r"[0-9a-f]{7,40}", parts[0]) and parts[1] not in status:
            status[parts[1]] = parts[-1]
    return status, workers


def _dvc(repo: Path, args: list[str], log=print, quiet: bool = False) -> str:
    res = run_dvc(args, cwd=repo, log=(lambda _: None) if quiet else log, tail_lines=1_000_000)
    if res.returncode != 0:
        raise SweepError(f"dvc {' '.join(args)} failed ({res.returncode}):\n" + "\n".join(res.lines[-30:]))
    return "\n".join(res.lines)


def system_spec(spec: str, system: str) -> str | None:
    """The metric column ``spec`` (``[file:]model.KEY``) for one system: the model's as it is, a
    baseline's ``[file:]baselines.<system>.KEY``; None for a baseline when the column is not the model's."""
    if system == "model":
        return spec
    path, _, key = spec.rpartition(":")
    head, _, rest = key.partition(".")
    return f"{path + ':' if path else ''}baselines.{system}.{rest}" if head == "model" and rest else None


def collect(show: list[dict], grid: Grid, baseline: bool = True) -> list[dict[str, Any]]:
    """Rows of the comparison from ``dvc exp show --json``: experiment, table, state, swept params, metrics
    (and ``<metric> lo`` / ``<metric> hi`` where the evaluate stage wrote a 95% CI for it). An experiment of
    a seed table gives one row per system (``system``: ``model`` and each baseline of the metrics file),
    followed, per point and system, by its :func:`seed_summary` row."""
    def row_of(entry: dict) -> dict[str, Any]:
        data = entry.get("data") or {}
        params: dict[str, Any] = {}
        for f in (data.get("params") or {}).values():
            params.update((f or {}).get("data") or {})
        return {"params": params, "metrics": {path: (m or {}).get("data") or {}
                                              for path, m in (data.get("metrics") or {}).items()}}

    def metric(metrics: dict[str, dict], spec: str) -> Any:
        path, _, key = spec.rpartition(":")
        files = [path] if path else ([EVAL_METRICS] if EVAL_METRICS in metrics else list(metrics))
        return next((v for f in files if (v := get_dotted(metrics.get(f), key)) is not None), None)

    found: dict[str, dict] = {}
    base_rows = []
    for base in show:
        if base.get("rev") != "workspace" and baseline:
            base_rows.append(("baseline", base.get("name") or base.get("rev", "")[:7], row_of(base), "committed"))
        for exp in base.get("experiments") or []:
            revs = exp.get("revs") or []
            if revs and exp.get("name") and exp["name"] not in found:
                state = (exp.get("executor") or {}).get("state") or ("failed" if revs[0].get("error") else "success")
                found[exp["name"]] = {"row": row_of(revs[0]), "state": state}
    keys = list(dict.fromkeys(k for _, _, p in grid.experiments() for k in p))
    labels = grid.experiment_labels()
    rows = []

    def head_of(table: str, name: str, state: str) -> dict[str, Any]:
        r: dict[str, Any] = {"table": table, "experiment": name, "state": state}
        return {**r, LABEL: labels[name]} if name in labels else r

    def make(table: str, name: str, got: dict, state: str, system: str | None = None) -> dict[str, Any]:
        r = head_of(table, name, state)
        r.update({k: get_dotted(got["params"], k) for k in keys})
        if grid.format == CXPMRG:
            r.update(encoder=describe_encoder(got["params"]), decoder=describe_llm(got["params"]))
        if system is not None:
            r["system"] = system
        for label, model_spec in grid.metrics.items():
            spec = system_spec(model_spec, system or "model")
            r[label] = metric(got["metrics"], spec) if spec else None
            if spec is None:
                continue
            path, _, key = spec.rpartition(":")
            head, _, rest = key.partition(".")
            if head == "baselines":  # ci95 is keyed by system: ci95.<baseline>.KEY
                head, _, rest = rest.partition(".")
            ci = metric(got["metrics"], f"{path + ':' if path else ''}ci95.{head}.{rest}") if rest else None
            if isinstance(ci, dict) and "lo" in ci:
                r[f"{label} lo"], r[f"{label} hi"] = ci["lo"], ci["hi"]
        return r

    def systems_of(got: dict) -> list[str]:
        """``model`` and the baselines of the metrics file the model's first metric column reads."""
        spec = next(iter(grid.metrics.values()), "")
        path = spec.rpartition(":")[0]
        files = [path] if path else ([EVAL_METRICS] if EVAL_METRICS in got["metrics"] else list(got["metrics"]))
        base = next((b for f in files if isinstance(b := get_dotted(got["metrics"].get(f), "baselines"), dict)), {})
        return ["model", *base]

    for table, name, got, state in base_rows[:1]:
        rows.append(make(table, name, got, state))
    for table in grid.tables:
        seeded = table in grid.seeds
        table_rows = []
        for name, t, _ in grid.experiments():
            if t != table:
                continue
            got = found.get(name)
            if not got:
                table_rows.append({**head_of(table, name, "missing"), **({"system": "model"} if seeded else {})})
            elif seeded:
                table_rows += [make(table, name, got["row"], got["state"], s) for s in systems_of(got["row"])]
            else:
                table_rows.append(make(table, name, got["row"], got["state"]))
        rows += seed_summary(table_rows, grid, table) if seeded else table_rows
    return rows


def describe_encoder(params: dict[str, Any]) -> str | None:
    """The encoder whose tokens the LLM reads (``generator_vision``, :class:`amrg.config.GeneratorVision`),
    from an experiment's params: the classifier's ``vision.name``, the seed 002 chain's ``pretrain_vision.name``
    (with the stages that ran: ARM, CTL) or a timm name; trained or frozen. None when the params lack it."""
    source, trained = get_dotted(params, "generator_vision.source"), get_dotted(params, "generator_vision.trainable")
    if source == "classifier":
        name = f"{get_dotted(params, 'vision.name')} (classifier's)"
    elif source == "pretrained":
        steps = [s for s, on in (("ARM", get_dotted(params, "pretrain_vision.objective") == "arm"),
                                 ("CTL", get_dotted(params, "pretrain_contrastive.enabled") is True)) if on]
        name = f"{get_dotted(params, 'pretrain_vision.name')} ({' + '.join(steps)})"
    elif source == "timm":
        name = str(get_dotted(params, "generator_vision.name"))
    else:
        return None
    return f"{name}, {'trained' if trained else 'frozen'}"


LLM_TRAINING = {"none": "frozen", "lora": "LoRA", "full": "trained"}  # llm.trainable -> how the table says it


def describe_llm(params: dict[str, Any]) -> str | None:
    """The generator's LLM (:class:`amrg.config.Llm`) from an experiment's params: a pretrained ``llm.name``,
    or the scratch Llama-architecture LM as ``layers x hidden_size``; with how it is trained. None when the
    params lack it."""
    source, trainable = get_dotted(params, "llm.source"), get_dotted(params, "llm.trainable")
    if source == "pretrained":
        name = str(get_dotted(params, "llm.name"))
    elif source == "scratch":
        name = f"scratch Llama {get_dotted(params, 'llm.layers')}x{get_dotted(params, 'llm.hidden_size')}"
    else:
        return None
    return f"{name}, {LLM_TRAINING.get(trainable, trainable)}"


def seed_summary(rows: list[dict[str, Any]], grid: Grid, table: str) -> list[dict[str, Any]]:
    """The rows of seed table ``table`` (one per seed run and system) regrouped per point and system, each
    group followed by its ``mean ± sd over N seeds`` row: state ``aggregate``, ``runtime.seed`` the seeds
    it averages, ``seeds`` N, and per metric column the mean and ``<metric> sd``, the sample standard
    deviation (n - 1; None with one seed). Only runs in state ``success`` count; a metric a run lacks is
    averaged over the runs that have it (``<metric> n``)."""
    out = []
    for config, members in grid.seed_groups(table):
        names = [n for n, _ in members]
        mine = [r for r in rows if r["experiment"] in names]
        systems = list(dict.fromkeys(r["system"] for r in mine if r.get("system")))
        for system in systems:
            runs = [r for r in mine if r.get("system") == system]
            out += runs
            ok = [r for r in runs if r["state"] == "success"]
            agg: dict[str, Any] = {"table": table, "experiment": f"mean ± sd over {len(ok)} seeds",
                                   "state": AGGREGATE, **config,
                                   SEED_KEY: ",".join(str(r.get(SEED_KEY)) for r in ok), "system": system,
                                   "seeds": len(ok)}
            for label in grid.metrics:
                values = [r[label] for r in ok if isinstance(r.get(label), (int, float))
                          and not isinstance(r.get(label), bool)]
                agg[label] = statistics.fmean(values) if values else None
                agg[f"{label} sd"] = statistics.stdev(values) if len(values) >= 2 else None
                if values and len(values) != len(ok):
                    agg[f"{label} n"] = len(values)
            out.append(agg)
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return "" if v is None else str(v)


def _cell(r: dict, c: str, grid: Grid) -> str:
    v = _fmt(r.get(c))
    if c not in grid.metrics:
        return v
    if r.get("state") == AGGREGATE:
        if r.get(c) is None:
            return ""
        v += f" ± {_fmt(r[f'{c} sd'])}" if r.get(f"{c} sd") is not None else " (one seed: no sd)"
        return v + (f" (n={r[f'{c} n']})" if r.get(f"{c} n") is not None else "")
    if r.get(f"{c} lo") is not None:
        v += f" [{_fmt(r[f'{c} lo'])}, {_fmt(r[f'{c} hi'])}]"
    return v


def to_markdown(rows: list[dict], grid: Grid, reference: list[dict[str, str]] | None = None) -> str:
    """One markdown table per paper table; metrics with a CI print as ``value [lo, hi]``. A seed table
    lists every seed run per system, then that system's ``mean ± sd`` row (the committed baseline row,
    not one of the seeds, is left out there; it stays in the CSV and the other tables). A table with
    labelled points has a ``label`` column. ``format: cxpmrg``: :func:`to_cxpmrg`, with ``reference``'s
    published rows in their own block."""
    if grid.format == CXPMRG:
        return to_cxpmrg(rows, grid, reference or [])
    parts = [f"# Sweep `{grid.name}`\n", "Metric columns: " + ", ".join(f"{k} = `{v}`" for k, v in grid.metrics.items())
             + ". Brackets: 95% bootstrap CI over test studies (evaluate.bootstrap)."
             + (" `mean ± sd over N seeds`: mean and sample standard deviation (n - 1) across the seed runs"
                f" (`{SEED_KEY}`) that succeeded." if grid.seeds else "") + "\n"]
    base = [r for r in rows if r["table"] == "baseline"]
    for table, points in grid.tables.items():
        seeded = table in grid.seeds
        swept = list(dict.fromkeys(k for p in points for k in p))
        cols = ["experiment", *([LABEL] if table in grid.labels else []), "state", *swept,
                *([SEED_KEY, "system"] if seeded else []), *grid.metrics]
        parts.append(f"## {grid.titles.get(table, table)} (`{table}`)\n")
        if seeded:
            parts.append(f"{len(grid.seeds[table])} seeds ({', '.join(map(str, grid.seeds[table]))}) per configuration.\n")
        parts.append("| " + " | ".join(cols) + " |")
        parts.append("|" + "|".join("---" for _ in cols) + "|")
        for r in ([] if seeded else base) + [r for r in rows if r["table"] == table]:
            parts.append("| " + " | ".join(_cell(r, c, grid) for c in cols) + " |")
        parts.append("")
    return "\n".join(parts)


def _bench_cell(value: Any, kind: str) -> str:
    """A measured CXPMRG cell: ``—`` when the run did not write the metric; scores to 3 decimals and
    minutes to 2 (as seed 002's tables print them), parameter counts in millions (``57.31M``)."""
    if value is None:
        return MISSING
    if isinstance(value, bool) or not isinstance(value, (int, float)) or kind == "text":
        return str(value)
    if kind == "count":
        return f"{value / 1e6:.2f}M" if value >= 1e4 else f"{value / 1e6:.4f}M"
    return f"{value:.3f}" if kind == "score" else f"{value:.2f}"


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def _md_table(header: list[str], body: list[list[str]]) -> list[str]:
    return [_md_row(header), "|" + "|".join("---" for _ in header) + "|", *(_md_row(r) for r in body)]


def to_cxpmrg(rows: list[dict], grid: Grid, reference: list[dict[str, str]]) -> str:
    """The CXPMRG-Bench table (seed 002 Tables 1-2 layout): per grid table, the measured rows (``#``, the
    point's label, encoder and LLM from its params, :data:`CXPMRG_COLUMNS`, experiment and state); then,
    apart and labelled "published, not rerun", the reference rows grouped by (table, protocol), each group
    under its protocol, numbers as the CSV has them. A metric a run did not write prints ``—``."""
    columns = [c for c in CXPMRG_COLUMNS if c.label in grid.metrics]
    parts = [f"# CXPMRG-Bench sweep `{grid.name}`\n",
             "Measured rows: this repository's pipeline on its configured data and device, one DVC experiment each "
             "(" + ", ".join(f"{c.label} = `{grid.metrics[c.label]}`" for c in columns) + "). "
             "Time: minutes to generate the test split; params in millions. 95% CIs: comparison.csv "
             "(`<metric> lo` / `hi`). Phantom images (the embedded default) are not comparable with real-image "
             "results.\n"]
    header = ["#", "System", "Encoder", "Decoder/LLM", *(c.label for c in columns), "Experiment", "State"]
    for table in grid.tables:
        mine = [r for r in rows if r["table"] == table]
        body = [[f"#{i:02d}", r.get(LABEL) or r["experiment"], r.get("encoder") or MISSING, r.get("decoder") or MISSING,
                 *(_bench_cell(r.get(c.label), c.kind) for c in columns), r["experiment"], r["state"]]
                for i, r in enumerate(mine, 1)]
        parts += [f"## {grid.titles.get(table, table)} (`{table}`): measured here\n", *_md_table(header, body), ""]
    if reference:
        published = [c for c in columns if c.reference]
        parts += [f"## Published, not rerun (`{grid.reference}`)\n",
                  "Copied from the papers; not produced by this repository and not comparable cell by cell with "
                  "the measured rows above (other data, split, hardware and scoring protocol: see each group's "
                  "protocol). Empty cells: not reported.\n"]
        ref_header = ["#", "System", "Venue", "Encoder", "Decoder/LLM", *(c.label for c in published), "Param",
                      "Param is"]
        groups: dict[tuple[str, str], list[dict[str, str]]] = {}
        for r in reference:
            groups.setdefault((r["table"], r["protocol"]), []).append(r)
        for (table, protocol), members in groups.items():
            body = [[r["index"], r["system"], r.get("venue") or "", r["encoder"], r["decoder"],
                     *(r[c.reference] for c in published), r["params"], r["params_meaning"]] for r in members]
            parts += [f"### {table} (published)\n", f"Protocol: {protocol}\n", *_md_table(ref_header, body), ""]
    return "\n".join(parts)


def to_csv(rows: list[dict]) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------- Prefect
@task(name="dvc-exp-queue", cache_policy=NO_CACHE)
def queue_experiments(repo: str, experiments: list[tuple[str, str, dict]]) -> list[str]:
    logger = get_run_logger()
    root = Path(repo)
    for _ in range(60):  # idle workers of an earlier run exit within seconds; a task queued meanwhile is lost
        _, (active, idle) = parse_queue_status(_dvc(root, ["queue", "status"], quiet=True))
        if active:
            raise SweepError(f"{active} DVC queue worker(s) busy in {repo}: wait for them (`dvc queue status`) "
                             "or stop them (`dvc queue stop`) first")
        if not idle:
            break
        time.sleep(2)
    removed = remove_experiments(root, [name for name, _, _ in experiments], log=logger.info)
    if removed:
        logger.info("removed %d experiment(s) of an earlier sweep with the same names", len(removed))
    for name, table, point in experiments:
        _dvc(root, ["exp", "run", "--queue", "--name", name, *set_args(point)], log=logger.info)
    return [name for name, _, _ in experiments]


@task(name="dvc-queue-run", cache_policy=NO_CACHE)
def run_queue(repo: str, names: list[str], jobs: int, poll_seconds: float, timeout_s: float) -> dict[str, str]:
    """``dvc queue start -j jobs``, then wait until every experiment of ``names`` is Success/Failed. An
    experiment still Queued/Running once no worker is left (twice in a row) counts as ``lost``."""
    logger = get_run_logger()
    root = Path(repo)
    _dvc(root, ["queue", "start", "-j", str(jobs)], log=logger.info)
    t0, idle_polls, last = time.monotonic(), 0, None
    while True:
        status, (active, idle) = parse_queue_status(_dvc(root, ["queue", "status"], quiet=True))
        mine = {n: status.get(n, "missing") for n in names}
        done = sum(s in DONE for s in mine.values())
        if (done, active) != last:
            logger.info("sweep: %d/%d finished, %d worker(s) active", done, len(names), active)
            last = (done, active)
        if done == len(names):
            return mine
        idle_polls = idle_polls + 1 if active == 0 and idle == 0 else 0
        if idle_polls >= 2:
            return {n: s if s in DONE else "lost" for n, s in mine.items()}
        if time.monotonic() - t0 > timeout_s:
            raise SweepError(f"sweep not finished after {timeout_s:.0f} s: {mine}")
        time.sleep(poll_seconds)


@task(name="sweep-table", cache_policy=NO_CACHE)
def comparison(repo: str, grid: Grid, out_dir: str, states: dict[str, str],
               reference: list[dict[str, str]] | None = None) -> list[dict]:
    root = Path(repo)
    text = _dvc(root, ["exp", "show", "--json"], quiet=True)
    start = min(i for i in (text.find("["), text.find("{")) if i >= 0)
    rows = collect(json.loads(text[start:]), grid)
    for r in rows:
        if states.get(r["experiment"]) == "lost":
            r["state"] = "lost"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = to_markdown(rows, grid, reference)
    write_text(out / "comparison.md", md)  # atomic: temp file, fsync, rename
    write_text(out / "comparison.csv", to_csv(rows))
    key = re.sub(r"[^a-z0-9-]", "-", f"sweep-{grid.name}".lower())
    create_table_artifact(key=key, table=[{k: v for k, v in r.items()} for r in rows],
                          description=f"Sweep `{grid.name}`: {len(rows)} rows; also {out / 'comparison.md'}")
    create_markdown_artifact(key=f"{key}-md", markdown=md, description=f"Sweep `{grid.name}` comparison")
    get_run_logger().info("comparison written to %s", out)
    return rows


@flow(name="amrg-sweep")
def sweep_flow(grid: str, repo: str = ".", jobs: int | None = None, tables: list[str] | None = None,
               out: str | None = None, poll_seconds: float = 10.0, timeout_hours: float = 48.0,
               dry_run: bool = False) -> list[dict]:
    """Queue every point of ``grid`` as a DVC experiment, run the queue, write the comparison table."""
    logger = get_run_logger()
    root = Path(repo).resolve()
    g, reference = prepare(grid, root, tables)  # the one validation: SweepConfigError before anything is queued
    experiments = g.experiments()
    out_dir = out or str(root / "artifacts" / "sweeps" / g.name)
    logger.info("sweep %s: %d experiments in %d table(s) -> %s", g.name, len(experiments), len(g.tables), out_dir)
    if dry_run:
        for name, _, point in experiments:
            logger.info("%s", queue_command(name, point))
        return [{"table": t, "experiment": n, "state": "dry-run", **p} for n, t, p in experiments]
    # queue workers start `dvc` and stage commands from PATH: run_dvc puts this interpreter's bin first
    names = queue_experiments(str(root), experiments)
    states = run_queue(str(root), names, jobs or g.jobs, poll_seconds, timeout_hours * 3600)
    failed = sorted(n for n, s in states.items() if s != "Success")
    if failed:
        logger.warning("%d experiment(s) did not succeed: %s (see `dvc queue logs <name>`)", len(failed), ", ".join(failed))
    return comparison(str(root), g, out_dir, states, reference)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.sweep", description=__doc__.splitlines()[0])
    ap.add_argument("--grid", required=True, help="grid YAML (e.g. sweeps/paper_tables.yaml)")
    ap.add_argument("--repo", default=".", help="directory holding dvc.yaml and params.yaml (default: .)")
    ap.add_argument("--jobs", type=int, default=None, help="parallel queue workers (default: the grid's `jobs`)")
    ap.add_argument("--tables", default=None, help="comma-separated tables of the grid to run (default: all)")
    ap.add_argument("--out", default=None, help="output folder (default: <repo>/artifacts/sweeps/<grid name>)")
    ap.add_argument("--poll", type=float, default=10.0, help="seconds between queue status checks")
    ap.add_argument("--dry-run", action="store_true", help="print the dvc commands, run nothing")
    args = ap.parse_args(argv)
    only = [t.strip() for t in args.tables.split(",") if t.strip()] if args.tables else None
    try:  # the flow validates the grid and every point before it queues anything
        if args.dry_run:  # the same validation, then the commands; no Prefect run, nothing queued
            grid, _ = prepare(args.grid, Path(args.repo).resolve(), only)
            for name, _, point in grid.experiments():
                print(queue_command(name, point))
            return 0
        rows = sweep_flow(grid=args.grid, repo=args.repo, jobs=args.jobs, tables=only, out=args.out,
                          poll_seconds=args.poll)
    except SweepConfigError as exc:
        ap.error(str(exc))
    except SweepError as exc:
        print(f"sweep failed: {exc}", file=sys.stderr)
        return 1
    grid, reference = prepare(args.grid, Path(args.repo).resolve(), only)  # already validated by the flow
    print(to_markdown(rows, grid, reference))
    return 0 if all(r["state"] in ("success", "committed", AGGREGATE) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
