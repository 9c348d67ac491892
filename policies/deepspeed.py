"""DeepSpeed-Inference / ZeRO-offload style layer-wise streaming: no prediction.

Each layer gathers all E of its experts before computing, routed or not (loads_whole_layer), and
while layer l computes every expert of layer l+1 is copied (layer 0 of the next pass after the
last layer); whatever is not of the running or the next layer is dropped when a copy needs room.
So at most 2 * E experts are resident and every expert crosses the link every pass: the
bandwidth-bound baseline. With a budget below one layer's experts, layers gather only what their
router picked.
"""
from __future__ import annotations

import numpy as np

from policies.base import Block, CacheView, Policy, PrefetchPlan, Step
from policies.registry import register
from policies.victims import until_fits


@register("deepspeed")
class DeepSpeed(Policy):
    loads_whole_layer = True
    fast_path = "next_layer"  # a plan that never depends on timing: sim.fast runs it (subclasses must re-declare)

    def __init__(self) -> None:
        self._now = 0

    def on_layer_start(self, step: Step, layer: int, probs: np.ndarray, experts: tuple[int, ...]) -> PrefetchPlan:
        self._now = layer
        following = (layer + 1) % self.ctx.model.num_layers
        return PrefetchPlan([((following, e, 0), 1.0) for e in range(self.ctx.model.num_experts)])

    def choose_victims(self, incoming: Block, need_bytes: int, cache: CacheView) -> list[Block]:
        """Drop every evictable block outside the running and the next layer, then (only if still
        short) the running layer's unpinned ones, then the next layer's, highest expert first."""
        live = (self._now, (self._now + 1) % self.ctx.model.num_layers)
        evictable = [b for b in cache.resident_blocks() if cache.is_evictable(b)]
        finished = [b for b in evictable if b[0] not in live]
        return until_fits(sorted((b for b in evictable if b[0] in live), key=lambda b: (b[0] != self._now, -b[1])),
                          need_bytes, cache, finished)
