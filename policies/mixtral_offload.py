"""Mixtral-Offloading (Eliseev & Mazur 2023): per-layer LRU plus speculative next-layer prefetch.

The cache is the per-layer LRU of `lru` (the budget split evenly over layers; their default keeps 4
of Mixtral's 8 experts per layer, offload_per_layer=4 in github dvmazur/mixtral-offloading
notebooks/demo.ipynb). After layer l's router has run, the top `guesses` experts guessed for layer
l+1 are prefetched (policies.speculation: the next router applied to this hidden state when the
trace has those gates, else the previous token's choices at l+1), never more than layer l+1's
share of the cache holds (a second guess would evict the first). The paper prefetches the top 1-2
guesses; the public code has no speculative loading (README: "Speculative expert prefetching").
"""
from __future__ import annotations

import numpy as np

from policies.base import PolicyContext, PrefetchPlan, Step
from policies.lru import LRU
from policies.registry import register
from policies.speculation import NextLayerGuess


@register("mixtral_offload")
class MixtralOffload(LRU):
    def __init__(self, guesses: int = 2, scope: str = "per_layer"):
        if guesses < 0:
            raise ValueError(f"guesses {guesses} must be at least 0")
        super().__init__(scope)
        self.guesses = guesses

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        self.speculation = NextLayerGuess(ctx.model.num_layers, ctx.model.num_experts)
        # guesses prefetched after each layer, set once: the layer quotas do not change
        self._widths = [self._width(layer + 1) for layer in range(ctx.model.num_layers)]

    def _width(self, following: int) -> int:
        """Guesses for layer `following`: none past the last layer, never more than its quota."""
        if following == self.ctx.model.num_layers:
            return 0
        if self.quota is None:
            return self.guesses
        return min(self.guesses, self.quota.quota[self.quota.key((following, 0, 0))])

    def on_layer_start(self, step: Step, layer: int, probs: np.ndarray, experts: tuple[int, ...]) -> PrefetchPlan | None:
        super().on_layer_start(step, layer, probs, experts)
        self.speculation.observe(layer, experts)
        width = self._widths[layer]
        if not width:
            return None
        following = layer + 1
        return PrefetchPlan([((following, e, 0), 1.0) for e in self.speculation.guess(step, layer, width)])

    def describe(self) -> dict:
        return {**super().describe(), "guesses": self.guesses, "guessed_from": self.speculation.source}
