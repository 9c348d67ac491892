"""A sweep's runs as one table, and its standard figures: python -m sim.results DIR [--out DIR]

One row per complete run (a directory holding metrics.json, under DIR at any depth): every knob of
the run's config is a column (a policy's knobs as policy_KNOB), and so is every metric, with the
unit in the name (_s seconds, _bytes or bytes_ bytes, _gb 1e9 bytes, rates as fractions). Writes
results.parquet and results.csv (runs), layer_results.parquet and .csv (one row per run and
layer) and figures/ (sim.plots, PNG and SVG) into DIR, or into --out.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from sim.budget import parse_budget
from sim.config import SimConfig
from sim.report import CONFIG_FILE, LAYERS_FILE, METRICS_FILE, TIMING_FILE, atomic_write_csv, write_atomically
from traces.cli import ArgumentParser, console as cli_console, run_cli
from traces.errors import UserError
from traces.format import REQUESTS

RESULTS = "results"  # results.parquet, results.csv
LAYER_RESULTS = "layer_results"
FIGURES = "figures"
POLICY_KNOB_PREFIX = "policy_"
# Knobs that never tell one series of a figure from another: the budget is the x axis, seeds are
# averaged, a trace's path is told by trace_name and dataset.
NOT_SERIES = {"policy", "budget", "seed", "trace"}
# Columns that start like a policy knob but are not one: settings of the run (policy_host) and a metric.
_NOT_KNOBS = {f.name for f in fields(SimConfig)} | {"policy_info"}


def is_policy_knob(column: str) -> bool:
    return column.startswith(POLICY_KNOB_PREFIX) and column not in _NOT_KNOBS


@dataclass
class SweepResults:
    runs: pd.DataFrame  # one row per complete run
    layers: pd.DataFrame  # one row per run and layer: layers.csv with the run's columns
    incomplete: list[Path]  # run directories without metrics.json (interrupted, or failed)


def _cell(value: Any) -> Any:
    """Lists and dicts become JSON text, so every column holds scalars (Parquet and CSV alike)."""
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value


@lru_cache(maxsize=None)
def trace_dataset(trace: str) -> str | None:
    """The datasets of a trace's requests ('gsm8k', 'gsm8k+mmlu'), or None where the trace is not here."""
    try:
        names = pd.read_parquet(Path(trace) / REQUESTS, columns=["dataset"])["dataset"]
    except (OSError, ValueError, KeyError):
        return None
    return "+".join(sorted(names.dropna().unique())) or None


def read_run(run_dir: Path, root: Path) -> tuple[dict[str, Any], pd.DataFrame]:
    """A run's row (knobs, then metrics) and its per-layer table."""
    config_path = run_dir / CONFIG_FILE
    if not config_path.is_file():
        raise UserError(f"{run_dir}: metrics.json without {CONFIG_FILE}; the run was written by another tool, "
                        "remove it or run it again")
    try:
        config = json.loads(config_path.read_text())
        metrics = json.loads((run_dir / METRICS_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{run_dir}: damaged JSON ({exc}); delete the run's metrics.json and restart the sweep") \
            from None
    row: dict[str, Any] = {"run_dir": run_dir.relative_to(root).as_posix()}
    for key, value in config.items():
        if key == "policy_params":
            row.update({f"{POLICY_KNOB_PREFIX}{k}": _cell(v) for k, v in value.items()})
        elif key not in metrics:  # else metrics.json holds the value resolved (a trace's path, a model's name)
            row[key] = _cell(value)
    row.update({key: _cell(value) for key, value in metrics.items()})
    timing = run_dir / TIMING_FILE
    if timing.is_file():
        try:
            row["wall_s"] = json.loads(timing.read_text())["wall_s"]
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # the wall time is informative only: a damaged timing.json leaves the column empty
    row["trace_name"] = Path(metrics["trace"]).name
    row["dataset"] = trace_dataset(metrics["trace"])
    # The budget asked for (budget_bytes is the one used: all_resident ignores the budget and holds every expert).
    bytes_per_expert = round(metrics["budget_bytes"] / metrics["budget_experts"])
    row["budget_gb"] = parse_budget(config["budget"], bytes_per_expert) / 1e9
    layers = pd.read_csv(run_dir / LAYERS_FILE)
    layers.insert(0, "run_dir", row["run_dir"])
    return row, layers


def gather(root: str | Path, progress: bool = True) -> SweepResults:
    """Every complete run under root (a sweep directory, or one run's directory)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such directory; give a sweep's directory (multirun/NAME) or a run's")
    run_dirs = sorted(p.parent for p in root.rglob(METRICS_FILE))
    started = {p.parent for p in root.rglob(CONFIG_FILE)} | {p.parent for p in root.rglob(".hydra")}
    incomplete = sorted(started - set(run_dirs))
    if not run_dirs:
        raise UserError(f"{root}: no complete run (no metrics.json) under it; run a sweep first, "
                        "e.g. python -m sim -m +policy=lru,belady +budget=2GB,6GB")
    rows, layer_tables = [], []
    for run_dir in tqdm(run_dirs, desc="runs", unit="run", disable=not progress, leave=False):
        row, layers = read_run(run_dir, root)
        rows.append(row)
        layer_tables.append(layers)
    runs = pd.DataFrame(rows)
    knobs = knob_columns(runs)
    first = ["run_dir", *knobs, "budget_gb", "budget_bytes"]
    runs = runs[first + [c for c in runs.columns if c not in first]]
    layers = pd.concat(layer_tables, ignore_index=True).merge(
        runs[["run_dir", *knobs, "budget_bytes", "budget_gb"]], on="run_dir", how="left")
    return SweepResults(runs, layers, incomplete)


def knob_columns(runs: pd.DataFrame) -> list[str]:
    """The columns that configure a run (settings and policy knobs), in the table's order."""
    settings = [f.name for f in fields(SimConfig) if f.name != "policy_params"]
    settings[settings.index("trace") + 1:] = ["trace_name", "dataset", *settings[settings.index("trace") + 1:]]
    policy_knobs = sorted(c for c in runs.columns if is_policy_knob(c))
    ordered = settings[:settings.index("policy") + 1] + policy_knobs + settings[settings.index("policy") + 1:]
    return [c for c in ordered if c in runs.columns]


def series_columns(runs: pd.DataFrame, within: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The policy, then the settings and policy knobs that vary: what tells one series of a figure
    from another. Within panels (one per value of the `within` columns), a column counts only
    where it varies inside a panel; a knob, where it varies for one policy; a trace's name, where it
    varies for one dataset."""
    within = list(within)

    def varies(column: str, inside: list[str]) -> bool:
        if not inside:
            return runs[column].nunique(dropna=False) > 1
        return runs.groupby(inside, dropna=False)[column].nunique(dropna=False).max() > 1

    knobs = knob_columns(runs)
    policy_knobs = [c for c in knobs if is_policy_knob(c) and varies(c, ["policy", *within])]
    settings = [c for c in knobs if not is_policy_knob(c) and c not in NOT_SERIES
                and c not in within and varies(c, within + (["dataset"] if c == "trace_name" else []))]
    return ["policy", *settings, *policy_knobs]


def series_labels(runs: pd.DataFrame, columns: list[str]) -> pd.Series:
    """'lru scope=global' for each run: the policy, then the other series columns set for it."""

    def label(row: pd.Series) -> str:
        parts = [str(row[c]) if c == "policy" else f"{c.removeprefix(POLICY_KNOB_PREFIX) if is_policy_knob(c) else c}={row[c]}"
                 for c in columns if pd.notna(row[c])]
        return " ".join(parts)

    return runs.apply(label, axis=1) if len(runs) else pd.Series([], dtype=str)


def by_budget(runs: pd.DataFrame, metric: str, group: list[str] | None = None) -> pd.DataFrame:
    """metric per series (rows) and budget in GB (columns), the mean over seeds and repeated runs."""
    group = series_columns(runs) if group is None else group
    table = runs.assign(series=series_labels(runs, group))
    return table.pivot_table(index="series", columns="budget_gb", values=metric, aggfunc="mean", sort=True)


def load_results(path: str | Path) -> pd.DataFrame:
    """The runs table: results.parquet or .csv as written by this module, or gathered from a sweep directory."""
    return _load(Path(path), RESULTS, lambda results: results.runs)


def load_layer_results(path: str | Path) -> pd.DataFrame:
    """The per-layer table: layer_results.parquet or .csv, or gathered from a sweep directory."""
    return _load(Path(path), LAYER_RESULTS, lambda results: results.layers)


def _load(path: Path, stem: str, pick) -> pd.DataFrame:
    if path.is_dir():
        return pick(gather(path, progress=False))
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    if path.suffix == ".csv":
        return pd.read_csv(path)
    raise UserError(f"{path}: not a sweep directory nor a {stem}.parquet or .csv table")


def write_tables(results: SweepResults, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, frame in ((RESULTS, results.runs), (LAYER_RESULTS, results.layers)):
        parquet, csv = out_dir / f"{stem}.parquet", out_dir / f"{stem}.csv"
        write_atomically(parquet, lambda tmp, frame=frame: frame.to_parquet(tmp, index=False))
        atomic_write_csv(csv, frame)
        written += [parquet, csv]
    return written


def print_summary(results: SweepResults, written: list[Path], console: Console | None = None) -> None:
    console = console or cli_console()
    hit = by_budget(results.runs, "hit_rate")
    table = Table(title=f"expert hit rate, {len(results.runs)} runs")
    table.add_column("series")
    for budget in hit.columns:
        table.add_column(f"{budget:.3g} GB", justify="right")
    for series, values in hit.iterrows():
        table.add_row(str(series), *("-" if pd.isna(v) else f"{v:.1%}" for v in values))
    console.print(table)
    if results.incomplete:
        console.print(f"[yellow]{len(results.incomplete)} incomplete run(s)[/] (no metrics.json), e.g. "
                      f"{results.incomplete[0]}: restart the sweep's command to finish them")
    for path in written:
        console.print(f"wrote {path}")


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments (the README's command lines are checked against it)."""
    parser = ArgumentParser(prog="python -m sim.results", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a sweep's directory (multirun/NAME), or one run's")
    parser.add_argument("--out", type=Path, help="where the tables and figures go (default: the sweep's directory)")
    parser.add_argument("--no-figures", action="store_true", help="write the tables only")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)

    def work() -> None:
        from sim.plots import save_standard_figures  # matplotlib only when drawing

        results = gather(args.sweep_dir)
        out = args.out or args.sweep_dir
        written = write_tables(results, out)
        if not args.no_figures:
            written += save_standard_figures(results.runs, results.layers, out / FIGURES)
        print_summary(results, written)

    run_cli(work)


if __name__ == "__main__":
    main()
