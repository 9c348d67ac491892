"""Oracle prefetch: perfect knowledge of future routing, same link and budget. READS THE FUTURE (a bound).

Before every pass and after every router, the queue is replaced by the experts needed next, in
order of need: walking the future uses from now on, every distinct expert until as many as the
cache holds (or `horizon_steps` passes ahead), each at a priority that puts the soonest first.
Eviction is Belady's (furthest next use first), and a prefetch is declined when every candidate
victim is needed before the expert it would make room for. With less room than one layer's top-k
experts nothing is prefetched (a prefetch could only displace the running layer's experts).

Copying the soonest need first aims at the least stall (for whole-expert copies; MoEpic's split
copies overlap differently). It bounds the hit rate where a copy is shorter than a layer's compute. Where copies take longer (offloaded Mixtral on
PCIe), the soonest need is still in flight when its router runs: a late prefetch, which cuts the
stall but is no hit, while the eviction it needed may have cost one; there a policy that copies
further ahead, or stalls to gather whole layers, can show more hits and still be slower.
"""
from __future__ import annotations

import numpy as np

from policies.base import Block, CacheView, PolicyContext, PrefetchPlan, Step
from policies.belady import Belady
from policies.registry import register


@register("oracle_prefetch")
class OraclePrefetch(Belady):
    reads_future = True
    fast_path = "oracle"  # its plans follow the future, not timing: sim.fast runs it (subclasses must re-declare)

    def __init__(self, horizon_steps: int = 64):
        if horizon_steps < 1:
            raise ValueError(f"horizon_steps {horizon_steps} must be at least 1")
        super().__init__("global")
        self.horizon_steps = horizon_steps

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        self.slots = sum(int(c.capacity_bytes // ctx.model.bytes_per_expert) for c in ctx.caches)
        layers, experts = ctx.model.num_layers, ctx.model.num_experts
        self._uses_by_block = [ctx.future.uses_of(l, e) for l in range(layers) for e in range(experts)]
        self._consumed = np.zeros(layers * experts, dtype=np.int64)
        self._upcoming = np.array([u[0] if len(u) else np.inf for u in self._uses_by_block], dtype=np.float64)

    def _plan(self, step: int) -> PrefetchPlan | None:
        """The next `slots` distinct experts needed within the horizon, soonest first."""
        if self.slots < self.ctx.model.top_k:
            return None  # less room than one layer's experts: a prefetch could only displace them
        limit = min(step + self.horizon_steps, self.ctx.future.num_steps) * self.ctx.model.num_layers
        upcoming = self._upcoming
        count = min(self.slots, len(upcoming))
        chosen = np.argpartition(upcoming, count - 1)[:count] if count < len(upcoming) else np.arange(len(upcoming))
        chosen = chosen[np.lexsort((chosen, upcoming[chosen]))]
        experts = self.ctx.model.num_experts
        return PrefetchPlan([((int(b) // experts, int(b) % experts, 0), -float(upcoming[b]))
                             for b in chosen if upcoming[b] < limit], replace=True)

    def on_step_start(self, step: Step) -> PrefetchPlan | None:
        self._now = self.ctx.future.position(step.index, 0) - 1
        return self._plan(step.index)

    def on_layer_start(self, step: Step, layer: int, probs: np.ndarray, experts: tuple[int, ...]) -> PrefetchPlan | None:
        super().on_layer_start(step, layer, probs, experts)
        base = layer * self.ctx.model.num_experts
        for e in experts:  # these uses are now: their next need moves on
            b = base + e
            uses, i = self._uses_by_block[b], int(self._consumed[b]) + 1
            self._consumed[b] = i
            self._upcoming[b] = uses[i] if i < len(uses) else np.inf
        return self._plan(step.index)

    def choose_victims(self, incoming: Block, need_bytes: int, cache: CacheView) -> list[Block] | None:
        if cache.free_bytes() < need_bytes:
            needed_at = self.ctx.future.next_use(incoming[0], incoming[1], self._now - 1)
            furthest = max((self._next_use(b) for b in self._resident if cache.is_evictable(b)), default=None)
            if furthest is not None and furthest <= needed_at:
                return None  # every candidate victim is needed first: the copy would cost a miss
        return super().choose_victims(incoming, need_bytes, cache)

    def describe(self) -> dict:
        return {"reads_future": True, "horizon_steps": self.horizon_steps}
