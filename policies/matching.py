"""Helpers shared by the history-matching policies (FineMoE, MoE-Infinity): cosine, best match, plan union."""
from __future__ import annotations

import numpy as np

from policies.base import Block, PrefetchPlan

EPS = 1e-8  # as torch.nn.functional.cosine_similarity


def unit(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """x scaled to unit L2 norm along `axis` (zero vectors stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), EPS)


def best_match(similarity: np.ndarray, stamps: np.ndarray) -> int:
    """Index of the highest similarity; ties go to the most recently stored entry (highest stamp)."""
    tied = np.flatnonzero(similarity == similarity.max())
    return int(tied[np.argmax(stamps[tied])]) if len(tied) > 1 else int(tied[0])


def union_plan(predictions: list[list[tuple[Block, float]]]) -> PrefetchPlan | None:
    """One queue-replacing plan for the requests of a batch: every block any of them predicts, at
    the highest priority any gives it, in first-seen order."""
    if len(predictions) == 1:
        return PrefetchPlan(predictions[0], replace=True)
    merged: dict[Block, float] = {}
    for blocks in predictions:
        for block, priority in blocks:
            if priority > merged.get(block, -np.inf):
                merged[block] = priority
    return PrefetchPlan(list(merged.items()), replace=True) if predictions else None
