"""Fiddler (Kamahori et al., ICLR 2025; efeslab/fiddler): the most popular experts live on the GPU,
as many as fit; a needed expert that is not there runs on the host CPU when that beats copying
its weights (the hidden state goes down, the result comes up), else it is copied into a slot kept
free for that and computed on the GPU.

Popularity comes from the training split (Fiddler profiles it offline on ShareGPT); without one,
experts rank by (layer, expert) as Fiddler's fallback list does. Fiddler decides with two
constants (latency_cpu per token, latency_gpu per copy); here the hardware profile's times decide
(policies.hybrid.cpu_beats_copy), so the rule flips with the link, the format and the batch.
"""
from __future__ import annotations

from policies.hybrid import COPY, CPU, StaticPlacement, cpu_beats_copy
from policies.registry import register


@register("fiddler")
class Fiddler(StaticPlacement):
    def __init__(self, copy_slots: int = 1):
        if copy_slots < 0:
            raise ValueError(f"copy_slots {copy_slots} must be >= 0")
        self.reserve_slots = copy_slots  # Fiddler's placeholder expert(s) for weights it copies

    def ranking(self) -> list[tuple[int, int]]:
        model = self.ctx.model
        keys = [(l, e) for l in range(model.num_layers) for e in range(model.num_experts)]
        if self.counts is None:
            return keys
        return sorted(keys, key=lambda k: (-self.counts[k], k))

    def elsewhere(self, layer: int, expert: int, tokens: int) -> str:
        nbytes = self.ctx.cache_of(layer, expert).block_bytes((layer, expert, 0))
        return CPU if cpu_beats_copy(self.ctx.timing, tokens, nbytes) else COPY

    def describe(self) -> dict:
        return {**super().describe(), "popularity": "training split" if self.counts is not None else "none"}
