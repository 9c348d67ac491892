"""Training curves of a stand-in: loss against tokens, and routing realism against tokens."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

REAL_MIXTRAL_REUSE = 0.375  # ../shared/docs/routing-realism.md, four decode sequences


def plot_curves(train_log: pd.DataFrame, eval_log: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, reuse_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    if len(train_log):
        loss_ax.plot(train_log["tokens"] / 1e6, train_log["train_loss_nats"], label="train", lw=0.8)
    loss_ax.plot(eval_log["tokens"] / 1e6, eval_log["heldout_loss_nats"], "o-", label="held-out")
    loss_ax.set(xlabel="training tokens (millions)", ylabel="loss (nats/token)", title=title)
    loss_ax.legend()
    reuse_ax.plot(eval_log["tokens"] / 1e6, 100 * eval_log["token_reuse"], "o-", label="token reuse")
    lru = [c for c in eval_log.columns if c.startswith("lru_hit_rate_")]
    if lru:
        middle = lru[len(lru) // 2]
        reuse_ax.plot(eval_log["tokens"] / 1e6, 100 * eval_log[middle], "s-",
                      label=f"per-layer LRU hit rate, {middle.removeprefix('lru_hit_rate_')}")
    reuse_ax.axhline(100 * REAL_MIXTRAL_REUSE, color="grey", ls="--", label="real Mixtral token reuse")
    reuse_ax.set(xlabel="training tokens (millions)", ylabel="%", title="routing locality (held-out, teacher-forced)")
    reuse_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
