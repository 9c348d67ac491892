"""The figure of `python -m traces.stats`: every statistic per layer, and hit rates against slots."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from traces.atomic import write_atomically

PER_LAYER_PANELS = (  # column, title, y label
    ("top_expert_share", "popularity: top expert's share", "share of the layer's expert uses"),
    ("token_reuse", "token-to-token reuse", "share of experts the next token reuses"),
    ("next_layer_recall", "recall of layer l+1 from layer l", "recall"),
)


def plot_stats(per_layer: pd.DataFrame, hit_rates: pd.DataFrame, path: Path) -> Path:
    """per_layer: layer_stats() rows with a `trace` column; hit_rates: cache_hit_rates() rows likewise."""
    fig = stats_figure(per_layer, hit_rates)
    path = Path(path)
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png"))
    return path


def stats_figure(per_layer: pd.DataFrame, hit_rates: pd.DataFrame):
    """The six panels, drawn without pyplot (no global state, nothing to close)."""
    from matplotlib import rcParams
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 8.5))
    axes = fig.subplots(2, 3)
    colors = rcParams["axes.prop_cycle"].by_key()["color"]
    traces = list(dict.fromkeys(per_layer["trace"]))
    for i, trace in enumerate(traces):
        color = colors[i % len(colors)]
        rows = per_layer[per_layer["trace"] == trace]
        for ax, (column, title, ylabel) in zip(axes[0], PER_LAYER_PANELS):
            ax.plot(rows["layer"], rows[column], color=color, label=trace)
            ax.set(title=title, xlabel="layer", ylabel=ylabel)
        entropy = axes[1, 0]
        entropy.plot(rows["layer"], rows["request_entropy_bits"], color=color)
        entropy.plot(rows["layer"], rows["iteration_entropy_bits"], color=color, linestyle="--")
        means = hit_rates[hit_rates["trace"] == trace].groupby("slots")[["lru_hit_rate", "belady_hit_rate"]].mean()
        for ax, column in zip(axes[1, 1:], ("lru_hit_rate", "belady_hit_rate")):
            ax.plot(means.index, means[column], marker="o", color=color, label=trace)
    axes[1, 0].set(title="entropy: request-level (solid) vs iteration-level (dashed)", xlabel="layer",
                   ylabel="entropy (bits)")
    for ax, name in zip(axes[1, 1:], ("per-layer LRU", "per-layer Belady")):
        ax.set(title=f"{name} hit rate (mean over layers)", xlabel="slots per layer", ylabel="hit rate", ylim=(0, 1))
    # One legend for every panel, below them: inside a panel it covers that panel's curves.
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), fontsize="small", frameon=False)
    fig.tight_layout(rect=(0, 0.04 + 0.03 * ((len(labels) - 1) // 3), 1, 1))
    return fig
