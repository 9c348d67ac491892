"""LRU, as Mixtral-Offloading (Eliseev & Mazur 2023) runs it: per-layer LRU, budget split over layers.

scope=per_layer (default): each layer keeps at most its even share of the cache and a miss evicts
that layer's least recently used expert. scope=global: one LRU over all layers.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterable

import numpy as np

from policies.base import Block, CacheView, Policy, PolicyContext, Step
from policies.quota import LayerQuota, quota_victims
from policies.registry import register

SCOPES = ("per_layer", "global")


@register("lru")
class LRU(Policy):
    fast_path = "lru"  # touch on use, demand copies, LRU victims: sim.fast runs it (subclasses must re-declare)

    def __init__(self, scope: str = "per_layer"):
        if scope not in SCOPES:
            raise ValueError(f"scope '{scope}' unknown; use {' or '.join(SCOPES)}")
        self.scope = scope
        # Least recent first, over all layers and per layer (the per-layer one finds a layer's
        # victim without walking the others).
        self._recency: OrderedDict[Block, None] = OrderedDict()
        self._layer_recency: list[OrderedDict[Block, None]] = []

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        self.quota = LayerQuota(ctx) if self.scope == "per_layer" else None
        self._layer_recency = [OrderedDict() for _ in range(ctx.model.num_layers)]

    def touch(self, block: Block) -> None:
        """Make a cached block the most recently used."""
        if block in self._recency:
            self._recency.move_to_end(block)
            self._layer_recency[block[0]].move_to_end(block)

    def on_layer_start(self, step: Step, layer: int, probs: np.ndarray, experts: tuple[int, ...]) -> None:
        for e in experts:
            self.touch((layer, e, 0))

    def on_copy_done(self, block: Block, prefetched: bool) -> None:
        self._recency[block] = None
        self._layer_recency[block[0]][block] = None
        self.touch(block)

    def victim_order(self, blocks: Iterable[Block]) -> Iterable[Block]:
        """Blocks in least-recently-used order, best victim first; subclasses may demote some."""
        return blocks

    def choose_victims(self, incoming: Block, need_bytes: int, cache: CacheView) -> list[Block]:
        order = self.victim_order
        victims = quota_victims(incoming, need_bytes, cache, self.quota,
                                lambda layer: order(self._layer_recency[layer]), lambda: order(self._recency))
        for block in victims:
            del self._recency[block]
            del self._layer_recency[block[0]][block]
        return victims

    def describe(self) -> dict:
        return {"scope": self.scope}
