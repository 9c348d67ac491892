"""Victim choice by vectorised ranking, for policies whose eviction order is a function of per-expert arrays."""
from __future__ import annotations

from typing import Callable

import numpy as np

from policies.base import Block, CacheView

# (layers, experts, parts) of the evictable blocks -> key columns, most significant first
Ranking = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, ...]]


def lowest_ranked(cache: CacheView, need_bytes: int, rank: Ranking) -> list[Block]:
    """Evictable blocks in ascending (keys..., block) order, as few as make `need_bytes` fit."""
    free = cache.free_bytes()
    if free >= need_bytes:
        return []
    table = cache.evictable_table()  # kept by the cache as blocks land, leave and are pinned
    if not len(table):
        return []
    layers, experts, parts = table[:, 0], table[:, 1], table[:, 2]
    keys = rank(layers, experts, parts)
    order = np.lexsort((parts, experts, layers) + tuple(reversed(keys)))  # a total order: rows' order is moot
    victims: list[Block] = []
    for i in order:
        if free >= need_bytes:
            break
        block = (int(layers[i]), int(experts[i]), int(parts[i]))
        victims.append(block)
        free += cache.block_bytes(block)
    return victims
