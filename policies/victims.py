"""Eviction, owned by the library: a policy ranks, the library takes victims until the copy fits.

A policy gives an order (Policy.eviction_order: blocks, best victim first); until_fits() takes them
one at a time, skipping any not evictable or already chosen, and only as long as the incoming block
does not fit beside the free memory, so a lazy order is ranked only as far as needed. Blocks a policy
evicts whatever the need (a per-layer quota's own replacement, DeepSpeed's finished layers) are
passed in `chosen`. This is the only loop that adds victims until enough bytes are free.

ranked() is the order of policies whose ranking is a function of per-expert arrays (vectorised).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import numpy as np
from numba import literal_unroll, njit

if TYPE_CHECKING:
    from policies.base import Block, CacheView

# (layers, experts, parts) of the evictable blocks -> key columns, most significant first
Ranking = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, ...]]


def until_fits(order: Iterable[Block], need_bytes: int, cache: CacheView, chosen: list[Block] | None = None) -> list[Block]:
    """`chosen` (extended in place, so an order may skip them), then blocks of `order` until
    need_bytes fit. The order is advanced only while they do not: a generator may update its own
    state for each block it yields (that block is taken). Fewer than needed when the order runs out
    (the cache then refuses the choice)."""
    victims = [] if chosen is None else chosen
    free = cache.free_bytes() + sum(cache.block_bytes(b) for b in victims)
    blocks = iter(order)
    while free < need_bytes:
        block = next(blocks, None)
        if block is None:
            break
        if block in victims or not cache.is_evictable(block):
            continue
        victims.append(block)
        free += cache.block_bytes(block)
    return victims


def ranked(cache: CacheView, rank: Ranking) -> Iterator[Block]:
    """Evictable blocks in ascending (keys..., block) order; ranked at the first victim asked for.

    The policy's keys are computed over every resident block (the cache's table as it stands, not
    a copy of its evictable part). Most copies need one victim: the first is found by narrowing the
    evictable rows to each key's minimum in turn, then to the lowest block (the cache's block codes
    order blocks as tuples do; _lowest, compiled), and the whole order is sorted only when a second
    is asked for. The block ends the key, so the order is total and both ways agree (a NaN key goes
    the sorted way)."""
    (layers, experts, parts, codes), evictable = cache.resident_table()
    rows = evictable.nonzero()[0]
    if not len(rows):
        return
    keys = tuple(rank(layers, experts, parts))
    first = _lowest(rows, keys, codes) if keys else int(rows[codes[rows].argmin()])
    if first >= 0:
        yield int(layers[first]), int(experts[first]), int(parts[first])
    order = np.lexsort((codes,) + keys[::-1])
    order = order[evictable[order]]
    for i in order[1:] if first >= 0 else order:
        yield int(layers[i]), int(experts[i]), int(parts[i])


@njit(cache=True)
def _lowest(rows: np.ndarray, keys: tuple, codes: np.ndarray) -> int:
    """The row of `rows` lowest by (keys..., codes): the rows tied at each key's minimum, key by key
    while more than one is left, then the lowest code among them; -1 where a key is NaN on a row
    still tied (that order is left to the sort). One pass per key instead of four numpy calls."""
    tied = rows.copy()
    n = len(tied)
    for key in literal_unroll(keys):
        if n > 1:
            low = key[tied[0]]
            for j in range(1, n):
                if key[tied[j]] < low:
                    low = key[tied[j]]
            kept = 0
            for j in range(n):
                value = key[tied[j]]
                if value != value:  # NaN
                    return -1
                if value == low:
                    tied[kept] = tied[j]
                    kept += 1
            n = kept
    best = tied[0]
    for j in range(1, n):
        if codes[tied[j]] < codes[best]:
            best = tied[j]
    return best
