"""Belady's MIN: the offline optimum of demand caching. READS THE FUTURE of the trace (a bound).

Evicts the resident expert whose next use lies furthest ahead (never again counts as furthest).
scope=global (default) bounds every demand policy with the same budget; scope=per_layer bounds
the per-layer-share schemes.
"""
from __future__ import annotations

import numpy as np

from policies.base import Block, CacheView, Policy, PolicyContext, Step
from policies.quota import LayerQuota, pick_victims
from policies.registry import register

SCOPES = ("global", "per_layer")


@register("belady")
class Belady(Policy):
    reads_future = True

    def __init__(self, scope: str = "global"):
        if scope not in SCOPES:
            raise ValueError(f"scope '{scope}' unknown; use {' or '.join(SCOPES)}")
        self.scope = scope
        self._now = -1

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        self.quota = LayerQuota(ctx) if self.scope == "per_layer" else None

    def on_layer_start(self, step: Step, layer: int, probs: np.ndarray, experts: tuple[int, ...]) -> None:
        self._now = self.ctx.future.position(step.index, layer)

    def choose_victims(self, incoming: Block, need_bytes: int, cache: CacheView) -> list[Block]:
        future, now = self.ctx.future, self._now
        ranked = sorted(cache.resident_blocks(), key=lambda b: (-future.next_use(b[0], b[1], now), b))
        return pick_victims(incoming, need_bytes, cache, ranked, self.quota)

    def describe(self) -> dict:
        return {"scope": self.scope, "reads_future": True}
