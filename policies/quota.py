"""Per-layer shares of the expert cache (Mixtral-Offloading's scheme) and victim picking under them.

On each GPU, a layer's quota is an even share of the slots its cache holds (the remainder to the first
layers; when shares fall below top-k, top-k slots stay aside for the experts a layer loads beyond
its share). A layer at its quota replaces its own least valuable expert; when the cache itself is
full, layers above their quota (possible when a share is 0) give up blocks first.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

from policies.base import Block, CacheView, PolicyContext
from policies.victims import until_fits


class LayerQuota:
    """Per (GPU, layer) shares of each GPU's slots, and how many blocks each holds now."""

    def __init__(self, ctx: PolicyContext):
        self.home = ctx.home
        self.quota: dict[tuple[int, int], int] = {}
        self.count: dict[tuple[int, int], int] = {}
        self.over_keys: set[tuple[int, int]] = set()  # (GPU, layer) pairs above their quota
        self._keys: dict[Block, tuple[int, int]] = {}
        for gpu, cache in enumerate(ctx.caches):
            layers = ctx.layers_of(gpu)
            if not layers:
                continue
            slots = int(cache.capacity_bytes // cache.block_bytes((layers[0], 0, 0)))
            if slots // len(layers) < ctx.model.top_k and slots > ctx.model.top_k:
                # A layer below top_k slots loads some experts beyond its share; keep room for them
                # aside, or each such load would evict another layer's protected expert.
                slots -= ctx.model.top_k
            share, extra = divmod(slots, len(layers))
            for i, layer in enumerate(layers):
                self.quota[gpu, layer] = share + (i < extra)
                self.count[gpu, layer] = 0

    def key(self, block: Block) -> tuple[int, int]:
        key = self._keys.get(block)
        if key is None:
            key = self._keys[block] = (self.home(block[0], block[1]), block[0])
        return key

    def full(self, block: Block) -> bool:
        key = self.key(block)
        return self.count[key] >= self.quota[key]

    def over(self, block: Block) -> bool:
        return self.key(block) in self.over_keys

    def add(self, block: Block, delta: int) -> None:
        key = self.key(block)
        self.count[key] += delta
        if self.count[key] > self.quota[key]:
            self.over_keys.add(key)
        else:
            self.over_keys.discard(key)


def quota_victims(incoming: Block, need_bytes: int, cache: CacheView, quota: LayerQuota | None,
                  ranked_in_layer: Callable[[int], Iterable[Block]],
                  ranked_all: Callable[[], Iterable[Block]]) -> list[Block]:
    """Victims, best first by the policy's ranking, honouring per-layer quotas when given: a layer
    at its quota replaces its own best victim whatever the need; then, while the block does not fit
    (policies.victims.until_fits), layers above their quota give up blocks first.

    ranked_in_layer(layer) and ranked_all() yield resident blocks best-victim-first; they are
    consumed lazily, so a ranking kept in order (LRU) costs a few steps per eviction.
    """
    if quota is None:
        return until_fits(ranked_all(), need_bytes, cache)
    victims: list[Block] = []

    def first(blocks: Iterable[Block], over_quota_only: bool) -> Block | None:
        for block in blocks:
            if (not over_quota_only or quota.over(block)) and cache.is_evictable(block) and block not in victims:
                return block
        return None

    def order() -> Iterator[Block]:
        """Each next victim given those taken so far (each one taken leaves its layer's count)."""
        while True:
            block = first(ranked_all(), True) if quota.over_keys else None
            if block is None:
                block = first(ranked_all(), False)
            if block is None:
                return
            quota.add(block, -1)
            yield block

    if quota.full(incoming):
        own = first(ranked_in_layer(incoming[0]), False)
        if own is not None:
            victims.append(own)
            quota.add(own, -1)
    until_fits(order(), need_bytes, cache, victims)
    quota.add(incoming, 1)
    return victims
