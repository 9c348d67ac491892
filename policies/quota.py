"""Per-layer shares of the expert cache (Mixtral-Offloading's scheme) and victim picking under them.

A layer's quota is an even share of the slots its GPU's cache holds (the remainder to the first
layers; when shares fall below top-k, top-k slots stay aside for the experts a layer loads beyond
its share). A layer at its quota replaces its own least valuable expert; when the cache itself is
full, layers above their quota (possible when a share is 0) give up blocks first.
"""
from __future__ import annotations

from typing import Iterable

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

    def admitted(self, block: Block) -> None:
        self.count[block[0]] += 1

    def evicted(self, block: Block) -> None:
        self.count[block[0]] -= 1


def pick_victims(incoming: Block, need_bytes: int, cache: CacheView, ranked: Iterable[Block],
                 quota: LayerQuota | None) -> list[Block]:
    """Victims in `ranked` order (best victim first), honouring per-layer quotas when given."""
    candidates = [b for b in ranked if cache.is_evictable(b)]
    victims: list[Block] = []
    free = cache.free_bytes()

    def take(predicate) -> bool:
        nonlocal free
        for block in candidates:
            if block not in victims and predicate(block):
                victims.append(block)
                free += cache.block_bytes(block)
                if quota is not None:
                    quota.evicted(block)
                return True
        return False

    layer = incoming[0]
    if quota is not None and quota.count[layer] >= quota.quota[layer]:
        take(lambda b: b[0] == layer)
    while free < need_bytes:
        if quota is not None and take(lambda b: quota.count[b[0]] > quota.quota[b[0]]):
            continue
        if not take(lambda b: True):
            break
    if quota is not None:
        quota.admitted(incoming)
    return victims
