"""What the policies that compute experts on the host CPU share (sim.host_cpu): the tokens each
expert serves in a pass, Fiddler's rule (the CPU when it finishes before a copy would), expert
popularity from a training split, and a static GPU placement that computes the rest elsewhere.

A static placement ranks experts (layer, expert) by how much it wants them on the GPU; the best
ranked that fit in each GPU's budget are loaded before serving (as these systems load the model)
and evicted last. A needed expert not resident goes wherever `elsewhere()` says: the CPU, or a
demand copy (into the slots left, evicting the worst ranked).
"""
from __future__ import annotations

import numpy as np

from policies.base import Block, Policy, PolicyContext, PrefetchPlan, Step, Timing
from traces.format import tally_experts

CPU, COPY = "cpu", "copy"


def layer_tokens(step: Step, layer: int, experts: tuple[int, ...]) -> list[int]:
    counts = None if step.expert_tokens is None else step.expert_tokens(layer)
    return [1] * len(experts) if counts is None else list(counts)


def cpu_beats_copy(timing: Timing, tokens: int, nbytes: float) -> bool:
    """Fiddler's choice for an expert missing on the GPU, with the profile's times instead of its
    two constants (latency_cpu, latency_gpu): compute on the CPU when that, with the activations'
    trips down and up, ends before copying the weights and computing on the GPU would."""
    return timing.cpu_expert_s(tokens) + timing.activation_s(tokens) < timing.copy_s(nbytes) + timing.expert_s(tokens)


def popularity(trace, requests: list[int]) -> np.ndarray:
    """[layers, experts]: how often each expert was chosen in the requests (decode and prompt tokens)."""
    counts = np.zeros((trace.model.num_layers, trace.model.num_experts), dtype=np.float64)
    for r in requests:
        offset, prefill, decode = trace.rows(r)
        counts += tally_experts(trace.experts[offset: offset + prefill + decode], trace.model.num_experts)
        if not prefill:
            counts += trace.prefill_counts[r]
    return counts


class StaticPlacement(Policy):
    uses_cpu = True
    preloads = True
    reserve_slots = 0  # slots per GPU kept free for demand copies (policies whose misses may copy)

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        self.counts: np.ndarray | None = None
        self._place()

    def fit(self, trace, requests: list[int]) -> None:
        self.counts = popularity(trace, requests)
        self._place()

    def ranking(self) -> list[tuple[int, int]]:
        """Every (layer, expert), most wanted on the GPU first."""
        raise NotImplementedError

    def elsewhere(self, layer: int, expert: int, tokens: int) -> str:
        """Where a needed expert that is not resident runs this pass: CPU or COPY."""
        return CPU

    def _place(self) -> None:
        ctx = self.ctx
        order = self.ranking()
        self.rank = {key: i for i, key in enumerate(order)}
        room = {g: int(c.capacity_bytes // c.block_bytes((0, 0, 0))) - self.reserve_slots
                for g, c in enumerate(ctx.caches)}
        self.placed: set[tuple[int, int]] = set()
        for layer, expert in order:
            gpu = ctx.home(layer, expert)
            if room[gpu] > 0:
                room[gpu] -= 1
                self.placed.add((layer, expert))

    def warm_blocks(self, gpu: int) -> list[Block]:
        return [(l, e, 0) for l, e in sorted(self.placed, key=self.rank.__getitem__) if self.ctx.home(l, e) == gpu]

    def eviction_key(self, block: Block):
        return (block[:2] in self.placed, -self.rank[block[:2]])

    def on_layer_start(self, step: Step, layer: int, probs: np.ndarray, experts: tuple[int, ...]) -> PrefetchPlan | None:
        cpu = tuple(e for e, t in zip(experts, layer_tokens(step, layer, experts))
                    if not self.ctx.cache_of(layer, e).is_resident((layer, e, 0)) and self.elsewhere(layer, e, t) == CPU)
        return PrefetchPlan(cpu=cpu) if cpu else None

    def describe(self) -> dict:
        return {"gpu_experts": len(self.placed)}
