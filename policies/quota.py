"""Per-layer shares of the expert cache (Mixtral-Offloading's scheme) and victim picking under them.

A layer's quota is an even share of the slots its GPU's cache holds (the remainder to the first
layers; when shares fall below top-k, top-k slots stay aside for the experts a layer loads beyond
its share). A layer at its quota replaces its own least valuable expert; when the cache itself is
full, layers above their quota (possible when a share is 0) give up blocks first.
"""
from __future__ import annotations

from typing import Callable, Iterable

from policies.base import Block, CacheView, PolicyContext


class LayerQuota:
    def __init__(self, ctx: PolicyContext):
        layers = ctx.model.num_layers
        self.quota = [0] * layers
        self.count = [0] * layers
        by_gpu: dict[int, list[int]] = {}
        for layer, gpu in enumerate(ctx.gpu_of_layer):
            by_gpu.setdefault(gpu, []).append(layer)
        for gpu, gpu_layers in by_gpu.items():
            cache = ctx.caches[gpu]
            slots = int(cache.capacity_bytes // cache.block_bytes((gpu_layers[0], 0, 0)))
            if slots // len(gpu_layers) < ctx.model.top_k and slots > ctx.model.top_k:
                # A layer below top_k slots loads some experts beyond its share; keep room for them
                # aside, or each such load would evict another layer's protected expert.
                slots -= ctx.model.top_k
            share, extra = divmod(slots, len(gpu_layers))
            for i, layer in enumerate(gpu_layers):
                self.quota[layer] = share + (i < extra)

    def full(self, layer: int) -> bool:
        return self.count[layer] >= self.quota[layer]

    def over(self, layer: int) -> bool:
        return self.count[layer] > self.quota[layer]


def pick_victims(incoming: Block, need_bytes: int, cache: CacheView, quota: LayerQuota | None,
                 ranked_in_layer: Callable[[int], Iterable[Block]],
                 ranked_all: Callable[[], Iterable[Block]]) -> list[Block]:
    """Victims, best first by the policy's ranking, honouring per-layer quotas when given.

    ranked_in_layer(layer) and ranked_all() yield resident blocks best-victim-first; they are
    consumed lazily, so a ranking kept in order (LRU) costs a few steps per eviction.
    """
    victims: list[Block] = []
    free = cache.free_bytes()

    def first(blocks: Iterable[Block], over_quota_only: bool) -> Block | None:
        for block in blocks:
            if cache.is_evictable(block) and block not in victims and (not over_quota_only or quota.over(block[0])):
                return block
        return None

    def take(block: Block) -> None:
        nonlocal free
        victims.append(block)
        free += cache.block_bytes(block)
        if quota is not None:
            quota.count[block[0]] -= 1

    layer = incoming[0]
    if quota is not None and quota.full(layer):
        own = first(ranked_in_layer(layer), False)
        if own is not None:
            take(own)
    while free < need_bytes:
        block = first(ranked_all(), True) if quota is not None else None
        if block is None:
            block = first(ranked_all(), False)
        if block is None:
            break
        take(block)
    if quota is not None:
        quota.count[layer] += 1
    return victims
