"""A sweep's standard figures, from sim.results' tables: metrics against the expert budget (one line
per series, one panel per model and dataset), the per-layer hit rate as a heat map, and bytes moved.

Figures are matplotlib Figure objects drawn without pyplot (no global state, no display needed);
save_figure writes PNG and SVG. Every axis names its unit.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from sim.report import write_atomically
from sim.results import series_columns, series_labels

FACETS = ("model", "dataset")
BUDGET_AXIS = "expert budget (GB)"
# Axis label and scale of the metrics drawn most often; others follow their unit suffix (axis()).
# Bytes and seconds get the unit that suits the values drawn (a sweep's copies reach terabytes).
LABELS = {
    "hit_rate": ("expert hit rate (%)", 100.0),
    "tpot_mean_s": ("TPOT, mean (ms)", 1e3),
    "tpot_p99_s": ("TPOT, p99 (ms)", 1e3),
    "ttft_mean_s": ("TTFT, mean (ms)", 1e3),
    "ttft_p99_s": ("TTFT, p99 (ms)", 1e3),
    "bytes_h2d": ("host-to-GPU bytes (GB)", 1e-9),
    "wasted_prefetch_bytes": ("prefetched, never used (GB)", 1e-9),
}
BYTE_UNITS = (("B", 1.0), ("kB", 1e3), ("MB", 1e6), ("GB", 1e9), ("TB", 1e12), ("PB", 1e15))
TIME_UNITS = (("us", 1e-6), ("ms", 1e-3), ("s", 1.0), ("min", 60.0), ("h", 3600.0))
# Context every sweep figure names in its title: what was simulated, on what, from which routing.
CONTEXT = (("model", "model"), ("hardware", "hardware"), ("trace_name", "trace"), ("trace_origin", "routing"))


def _unit(units: tuple[tuple[str, float], ...], largest: float) -> tuple[str, float]:
    """The largest unit in which `largest` is at least 1 (the smallest unit for 0 or NaN)."""
    chosen = units[0]
    for name, size in units:
        if largest >= size:
            chosen = (name, size)
    return chosen


def axis(metric: str, largest: float | None = None) -> tuple[str, float]:
    """The label (with unit) and the factor from the column's unit to the axis' unit. With `largest`
    (the largest value drawn, in the column's unit), bytes and seconds take the unit that suits it."""
    label, scale = LABELS.get(metric) or _default_axis(metric)
    kind = BYTE_UNITS if "bytes" in metric else TIME_UNITS if metric.endswith("_s") else None
    if kind is None or largest is None or not math.isfinite(largest):
        return label, scale
    name, size = _unit(kind, abs(largest))
    return f"{label.rsplit(' (', 1)[0]} ({name})", 1.0 / size


def _default_axis(metric: str) -> tuple[str, float]:
    name = metric.replace("_", " ")
    if metric.endswith("_s"):
        return f"{name[:-2]} (ms)", 1e3
    if "bytes" in metric:
        return f"{name} (GB)", 1e-9
    if metric.endswith("rate"):
        return f"{name} (%)", 100.0
    return name, 1.0


def context(runs: pd.DataFrame) -> str:
    """'model mixtral-8x7b | hardware h100 | trace NAME | routing ...': what the figure's runs share, or
    the values they span."""
    parts = []
    for column, name in CONTEXT:
        if column in runs.columns:
            values = sorted(str(v) for v in runs[column].dropna().unique())
            if values:
                parts.append(f"{name} {', '.join(values)}")
    return " | ".join(parts)


def ignores_budget(policy: str) -> bool:
    from policies import policy_class

    try:
        return policy_class(policy).ignores_budget
    except ValueError:  # a policy not registered here (results from elsewhere): drawn as any other
        return False


def panels(count: int, ncols: int = 3, size: tuple[float, float] = (4.8, 3.4)) -> tuple[Figure, list[Axes]]:
    ncols = max(1, min(ncols, count))
    nrows = math.ceil(count / ncols)
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for unused in axes[count:]:
        unused.set_visible(False)
    return fig, axes[:count]


def facet_groups(frame: pd.DataFrame, columns: list[str]) -> list[tuple[str, pd.DataFrame]]:
    """One (title, rows) per combination of the columns' values; the whole frame when there are none."""
    if not columns:
        return [("", frame)]
    return [(" / ".join(str(k) for k in key), rows) for key, rows in frame.groupby(columns, dropna=False, sort=True)]


def colors(labels: list[str]) -> dict[str, str]:
    """One colour per series, the same in every panel and figure of a sweep."""
    return {label: f"C{i % 10}" for i, label in enumerate(sorted(set(labels)))}


def metric_vs_budget(runs: pd.DataFrame, metric: str, *, facet: tuple[str, ...] = FACETS,
                     dashed: str | None = None) -> Figure:
    """metric against the budget, one line per series (the mean over seeds), one panel per facet.

    dashed: a second metric of the same unit drawn dashed in the series' colour (e.g. p99 beside mean).
    A policy that ignores the budget (all_resident holds every expert) is one horizontal line, not
    points at budgets it never used. The title says the model, hardware, trace and routing.
    """
    varying = [c for c in facet if c in runs.columns and runs[c].nunique(dropna=False) > 1]
    table = runs.assign(series=series_labels(runs, series_columns(runs, within=varying)))
    groups = facet_groups(table, varying)
    palette = colors(table["series"].tolist())
    drawn = [metric] + ([dashed] if dashed else [])
    largest = float(np.nanmax(runs[drawn].to_numpy(dtype=float))) if len(runs) else None
    label, scale = axis(metric, largest)
    fig, axes = panels(len(groups))
    for ax, (title, rows) in zip(axes, groups):
        means = rows.groupby(["series", "budget_gb"], sort=True)[drawn].mean()
        fixed = {name for name, policy in zip(rows["series"], rows["policy"]) if ignores_budget(policy)}
        for name, curve in means.groupby(level="series", sort=True):
            x = curve.index.get_level_values("budget_gb")
            if name in fixed:
                ax.axhline(curve[metric].mean() * scale, color=palette[name], linestyle=":",
                           label=f"{name} (every expert resident, any budget)")
                continue
            ax.plot(x, curve[metric] * scale, marker="o", color=palette[name], label=name)
            if dashed:
                ax.plot(x, curve[dashed] * scale, marker=".", linestyle="--", color=palette[name])
        ax.set(xlabel=BUDGET_AXIS, ylabel=label, title=title)
        ax.ticklabel_format(axis="y", style="plain", useOffset=False)  # no "x 1e6" beside the axis
        ax.grid(alpha=0.3)
    legend_title = f"solid: {label}\ndashed: {axis(dashed, largest)[0]}" if dashed else None
    axes[0].legend(fontsize="small", title=legend_title, title_fontsize="small")
    fig.suptitle(context(runs), fontsize="small")
    return fig


def layer_hit_rate_heatmap(layers: pd.DataFrame) -> Figure:
    """Hit rate per layer (x) and budget (y), one panel per series (model and dataset included)."""
    series = series_columns(layers)
    table = layers.assign(series=series_labels(layers, series))
    names = sorted(table["series"].unique())
    fig, axes = panels(len(names))
    image = None
    for ax, name in zip(axes, names):
        grid = table[table["series"] == name].pivot_table(index="budget_gb", columns="layer", values="hit_rate",
                                                          aggfunc="mean", sort=True)
        image = ax.imshow(grid.to_numpy(dtype=float) * 100, aspect="auto", origin="lower", vmin=0, vmax=100,
                          cmap="viridis", interpolation="nearest")
        ax.set_yticks(np.arange(len(grid.index)), [f"{b:g}" for b in grid.index])
        ax.set(xlabel="layer", ylabel=BUDGET_AXIS, title=name)
    fig.colorbar(image, ax=axes, label="expert hit rate (%)")
    fig.suptitle(context(layers), fontsize="small")
    return fig


def standard_figures(runs: pd.DataFrame, layers: pd.DataFrame) -> dict[str, Figure]:
    wasted = "wasted_prefetch_bytes" if runs["wasted_prefetch_bytes"].fillna(0).gt(0).any() else None
    return {
        "hit_rate_vs_budget": metric_vs_budget(runs, "hit_rate"),
        "tpot_vs_budget": metric_vs_budget(runs, "tpot_mean_s", dashed="tpot_p99_s"),
        "ttft_vs_budget": metric_vs_budget(runs, "ttft_mean_s", dashed="ttft_p99_s"),
        "layer_hit_rate_heatmap": layer_hit_rate_heatmap(layers),
        "bytes_moved_vs_budget": metric_vs_budget(runs, "bytes_h2d", dashed=wasted),
    }


def save_figure(fig: Figure, out_dir: str | Path, name: str) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.{fmt}" for fmt in ("png", "svg")]
    for path in paths:
        write_atomically(path, lambda tmp, fmt=path.suffix[1:]: fig.savefig(tmp, format=fmt, dpi=150))
    return paths


def save_standard_figures(runs: pd.DataFrame, layers: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    return [path for name, fig in standard_figures(runs, layers).items() for path in save_figure(fig, out_dir, name)]
