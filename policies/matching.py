"""Helpers shared by the history-matching policies (FineMoE, MoE-Infinity): cosine, best match, plan union, map accuracy."""
from __future__ import annotations

import numpy as np

from policies.base import PrefetchPlan

EPS = 1e-8  # as torch.nn.functional.cosine_similarity


def unit(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """x scaled to unit L2 norm along `axis` (zero vectors stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    # np.linalg.norm's own computation for one axis (without its Python wrapper: this runs every layer)
    return x / np.maximum(np.sqrt(np.add.reduce(x * x, axis=axis, keepdims=True)), EPS)


def best_match(similarity: np.ndarray, stamps: np.ndarray) -> int:
    """Index of the highest similarity (1-D); ties go to the most recently stored entry (highest stamp)."""
    tied = (similarity == np.maximum.reduce(similarity)).nonzero()[0]
    return int(tied[np.argmax(stamps[tied])]) if len(tied) > 1 else int(tied[0])


class MapAccuracy:
    """How often a layer's used experts are among the top of the policy's latest prediction for it
    (as many as it used): the report's map_accuracy."""

    def __init__(self) -> None:
        self.hits, self.uses = 0, 0

    def observe(self, prediction: np.ndarray, experts: tuple[int, ...]) -> None:
        """A layer ran `experts`; `prediction` is its row of scores (all zero: no prediction, not counted)."""
        if prediction.any():
            top = np.argsort(-prediction, kind="stable")[: len(experts)]
            self.hits += len(set(top.tolist()) & set(experts))
            self.uses += len(experts)

    @property
    def value(self) -> float:
        return self.hits / self.uses if self.uses else float("nan")


def union_plan(layers: np.ndarray, experts: np.ndarray, priorities: np.ndarray,
               limit: int | None = None, distinct: bool = False) -> PrefetchPlan:
    """One queue-replacing plan for the requests of a batch, from their predictions' (layer, expert,
    priority) arrays concatenated in the requests' order: every block any of them predicts, at the
    highest priority any gives it, highest first, equal priorities in first-seen order; at most
    `limit` entries. distinct: the caller knows no block repeats (one request's prediction), so
    none is looked for. Built with numpy and handed over as arrays (PrefetchPlan.of_arrays): plans
    are hundreds of entries, rebuilt after every layer."""
    layers, experts = np.asarray(layers, dtype=np.int64), np.asarray(experts, dtype=np.int64)
    if not distinct:
        keys = layers * (int(experts.max(initial=0)) + 1) + experts
        seen = np.zeros(int(keys.max(initial=0)) + 1, dtype=np.bool_)
        seen[keys] = True
        distinct = np.count_nonzero(seen) == len(keys)
    if not distinct:  # several requests predicted one block: keep its highest priority
        unique, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        best = np.full(len(unique), -np.inf, dtype=np.result_type(priorities, np.float32))
        np.maximum.at(best, inverse, priorities)
        ranking = np.lexsort((first, -best))
        order, priorities = first[ranking], best[ranking]
        layers, experts = layers[order], experts[order]
    else:
        order = np.argsort(-priorities, kind="stable")
        layers, experts, priorities = layers[order], experts[order], priorities[order]
    if limit is not None:
        layers, experts, priorities = layers[:limit], experts[:limit], priorities[:limit]
    return PrefetchPlan.of_arrays(layers, experts, priorities, replace=True)
