"""Belady's MIN: the offline optimum of demand caching. READS THE FUTURE of the trace (a bound).

Evicts the resident expert whose next use lies furthest ahead (never again counts as furthest;
ties go to the lowest block). scope=global (default) bounds every demand policy with the same
budget; scope=per_layer bounds the per-layer-share schemes.
"""
from __future__ import annotations

import numpy as np

from policies.base import Block, CacheView, Policy, PolicyContext, Step
from policies.quota import LayerQuota, quota_victims
from policies.registry import register

SCOPES = ("global", "per_layer")


@register("belady")
class Belady(Policy):
    reads_future = True
    fast_path = "belady"  # demand copies, furthest-next-use victims: sim.fast runs it (subclasses must re-declare)

    def __init__(self, scope: str = "global"):
        if scope not in SCOPES:
            raise ValueError(f"scope '{scope}' unknown; use {' or '.join(SCOPES)}")
        self.scope = scope
        self._now = -1

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        self.quota = LayerQuota(ctx) if self.scope == "per_layer" else None
        self._resident: set[Block] = set()
        self._uses: dict[tuple[int, int], list[int]] = {}
        self._cursor: dict[tuple[int, int], int] = {}

    def on_layer_start(self, step: Step, layer: int, probs: np.ndarray, experts: tuple[int, ...]) -> None:
        self._now = self.ctx.future.position(step.index, layer)

    def on_copy_done(self, block: Block, prefetched: bool) -> None:
        self._resident.add(block)

    def _next_use(self, block: Block) -> float:
        """Next use after now; the clock only moves forward, so a cursor per expert suffices."""
        key = (block[0], block[1])
        uses = self._uses.get(key)
        if uses is None:
            uses = self._uses[key] = self.ctx.future.uses_of(*key).tolist()
        i = self._cursor.get(key, 0)
        while i < len(uses) and uses[i] <= self._now:
            i += 1
        self._cursor[key] = i
        return uses[i] if i < len(uses) else float("inf")

    def _ranked(self, blocks) -> list[Block]:
        return sorted(blocks, key=lambda b: (-self._next_use(b), b))

    def choose_victims(self, incoming: Block, need_bytes: int, cache: CacheView) -> list[Block]:
        ranked_all: list[Block] = []

        def all_blocks() -> list[Block]:
            if not ranked_all:
                ranked_all.extend(self._ranked(self._resident))
            return ranked_all

        victims = quota_victims(incoming, need_bytes, cache, self.quota,
                                lambda layer: self._ranked(b for b in self._resident if b[0] == layer), all_blocks)
        self._resident.difference_update(victims)
        return victims

    def describe(self) -> dict:
        return {"scope": self.scope, "reads_future": True}
