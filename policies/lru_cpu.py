"""Per-layer LRU whose misses compute on the host CPU when that beats copying (Fiddler's rule,
policies.hybrid.cpu_beats_copy), while the missed expert is copied in the background (a
prefetch) so that its next use hits: the cache adapts as LRU's does, and a miss never stalls the
layer on a copy the CPU would beat (as MoE-Lightning and HybriMoE combine the two)."""
from __future__ import annotations

import numpy as np

from policies.base import PrefetchPlan, Step
from policies.hybrid import cpu_beats_copy, layer_tokens
from policies.lru import LRU
from policies.registry import register


@register("lru_cpu")
class LruCpu(LRU):
    uses_cpu = True

    def __init__(self, scope: str = "per_layer", background_copy: bool = True):
        super().__init__(scope)
        self.background_copy = bool(background_copy)

    def on_layer_start(self, step: Step, layer: int, probs: np.ndarray, experts: tuple[int, ...]) -> PrefetchPlan | None:
        super().on_layer_start(step, layer, probs, experts)
        ctx, cpu = self.ctx, []
        for e, t in zip(experts, layer_tokens(step, layer, experts)):
            block, cache = (layer, e, 0), ctx.cache_of(layer, e)
            if not cache.is_resident(block) and not cache.is_in_flight(block) \
                    and cpu_beats_copy(ctx.timing, t, cache.block_bytes(block)):
                cpu.append(e)
        if not cpu:
            return None
        copies = [((layer, e, 0), 0.0) for e in cpu] if self.background_copy else []
        return PrefetchPlan(blocks=copies, cpu=tuple(cpu))

    def describe(self) -> dict:
        return {**super().describe(), "background_copy": self.background_copy}
