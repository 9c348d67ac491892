"""The figure of `python -m traces.stats`: every statistic per layer, and hit rates against slots."""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

PER_LAYER_PANELS = (
    ("top_expert_share", "popularity: top expert's share"),
    ("token_reuse", "token-to-token reuse"),
    ("next_layer_recall", "recall of layer l+1 from layer l"),
)


def plot_stats(per_layer: pd.DataFrame, hit_rates: pd.DataFrame, path: Path) -> Path:
    """per_layer: layer_stats() rows with a `trace` column; hit_rates: cache_hit_rates() rows likewise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    traces = list(dict.fromkeys(per_layer["trace"]))
    for i, trace in enumerate(traces):
        color = colors[i % len(colors)]
        rows = per_layer[per_layer["trace"] == trace]
        for ax, (column, title) in zip(axes[0], PER_LAYER_PANELS):
            ax.plot(rows["layer"], rows[column], color=color, label=trace)
            ax.set_title(title)
            ax.set_xlabel("layer")
        entropy = axes[1, 0]
        entropy.plot(rows["layer"], rows["request_entropy_bits"], color=color, label=f"{trace}: request-level")
        entropy.plot(rows["layer"], rows["iteration_entropy_bits"], color=color, linestyle="--",
                     label=f"{trace}: iteration-level")
        means = hit_rates[hit_rates["trace"] == trace].groupby("slots")[["lru_hit_rate", "belady_hit_rate"]].mean()
        for ax, column in zip(axes[1, 1:], ("lru_hit_rate", "belady_hit_rate")):
            ax.plot(means.index, means[column], marker="o", color=color, label=trace)
    axes[1, 0].set_title("entropy (bits): request-level vs iteration-level")
    axes[1, 0].set_xlabel("layer")
    for ax, name in zip(axes[1, 1:], ("per-layer LRU", "per-layer Belady")):
        ax.set_title(f"{name} hit rate (mean over layers)")
        ax.set_xlabel("slots per layer")
        ax.set_ylim(0, 1)
    axes[0, 0].legend(fontsize="small")
    axes[1, 0].legend(fontsize="x-small")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
