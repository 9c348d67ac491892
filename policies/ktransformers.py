"""KTransformers' CPU-GPU expert scheduling (kvcache-ai/ktransformers, experts-sched tutorial):
a fixed set of GPU experts, every other expert computed on the CPU, nothing copied on demand.

strategy (--kt-expert-placement-strategy): uniform (the same number of GPU experts in every layer,
lowest ids first), frequency (the most activated experts overall, from the training split; uniform
without one), front-loading (layer 0's experts first, then layer 1's...), random (fixed seed 42).
dynamic=True (--kt-enable-dynamic-expert-update): a prefill of at least prefill_threshold tokens
(--kt-gpu-prefill-token-threshold) re-picks each layer's GPU experts as the ones that prefill
activates most, keeping the layer's count; the new ones are copied in the background and run on
the CPU until they land.
"""
from __future__ import annotations

import numpy as np

from policies.base import PrefetchPlan, Step
from policies.hybrid import StaticPlacement, layer_tokens
from policies.registry import register

STRATEGIES = ("uniform", "frequency", "front_loading", "random")


@register("ktransformers")
class KTransformers(StaticPlacement):
    def __init__(self, strategy: str = "uniform", dynamic: bool = False, prefill_threshold: int = 512):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy '{strategy}' unknown; use one of {', '.join(STRATEGIES)}")
        self.strategy, self.dynamic, self.prefill_threshold = strategy, bool(dynamic), int(prefill_threshold)
        self.updates = 0

    def ranking(self) -> list[tuple[int, int]]:
        model = self.ctx.model
        keys = [(l, e) for l in range(model.num_layers) for e in range(model.num_experts)]
        if self.strategy == "front_loading":
            return keys
        if self.strategy == "random":
            return [keys[i] for i in np.random.default_rng(42).permutation(len(keys))]
        if self.strategy == "frequency" and self.counts is not None:
            return sorted(keys, key=lambda k: (-self.counts[k], k))
        return sorted(keys, key=lambda k: (k[1], k[0]))  # uniform: expert 0 of every layer, then 1...

    def on_layer_start(self, step: Step, layer: int, probs: np.ndarray, experts: tuple[int, ...]) -> PrefetchPlan | None:
        plan = super().on_layer_start(step, layer, probs, experts)
        tokens = dict(zip(experts, layer_tokens(step, layer, experts)))
        prompt = sum(tokens.values()) // self.ctx.model.top_k
        if not (self.dynamic and step.kind == "prefill" and prompt >= self.prefill_threshold):
            return plan
        placed = [e for e in range(self.ctx.model.num_experts) if (layer, e) in self.placed]
        chosen = sorted(range(self.ctx.model.num_experts), key=lambda e: (-tokens.get(e, 0), self.rank[layer, e]))
        chosen = chosen[:len(placed)]
        for e in placed:
            self.placed.discard((layer, e))
        self.placed.update((layer, e) for e in chosen)
        for i, e in enumerate(chosen):  # the layer's new set ranks first among its experts
            self.rank[layer, e] = -len(chosen) + i
        self.updates += 1
        fresh = [((layer, e, 0), 1.0) for e in chosen if not self.ctx.cache_of(layer, e).is_resident((layer, e, 0))]
        return PrefetchPlan(blocks=fresh, cpu=() if plan is None else plan.cpu)

    def describe(self) -> dict:
        return {**super().describe(), "strategy": self.strategy, "dynamic_updates": self.updates}
