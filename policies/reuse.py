"""Ours: eviction by predicted reuse distance, timely prefetch gated by its expected saving, and
free-space preloading by frequency (none reads the future).

Three ideas, each a knob so that its contribution is measured on its own (sim.reproduce's ablation):

- eviction="reuse": an expert's chance p of being used by the next pass at its layer blends a
  frequency (`prior_weight`) with a decayed count of its recent uses (`decay`, the dynamic part).
  The frequency is the training split's, pulled toward the running request's own: (its uses so far
  + s x training frequency) / (its passes so far + s), s = `prior_passes` (inf: the training
  split's alone); requests keep to a topic's experts (gpt-oss: 4.0 bits of entropy per layer within
  a request), so the request's own count predicts beyond the recent few passes. Its expected distance to the next use, in
  layers, is the layers until its layer runs again plus L (1 - p) / p (geometric in passes); the
  farthest goes first, as Belady would evict if p were right. eviction="lru": one LRU over all
  layers of a GPU.
- prefetch="timely": after layer l's router, experts of layer l + j are predicted from the
  training split's co-occurrence P(e' at l + j | e at l), averaged over the experts l chose, and
  only for j >= the layers one copy takes (ctx.timing: copy time over a layer's compute) after the
  layer's own demand copies (they go first on the link), so a copy can land before its layer: on a
  link that demand copies keep busy this leaves nothing to prefetch; only those with q >= min_q, whose expected saving q x copy beats
  the delay (1 - q) x copy a wrong copy puts in front of demand copies on a busy link. A prefetch
  evicts only experts whose own p is below its q, else it is declined. prefetch="none": demand only.
- preload=True: while a GPU's cache has free room, the most used experts of the training split not
  resident are copied into it at the lowest priority, never evicting anything.
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from policies.base import Block, CacheView, Policy, PolicyContext, PrefetchPlan, RequestInfo, Step
from policies.registry import register
from policies.victims import ranked
from traces import Trace

EVICTIONS = ("reuse", "lru")
PREFETCHES = ("timely", "none")


@register("reuse")
class Reuse(Policy):
    def __init__(self, eviction: str = "reuse", prefetch: str = "timely", preload: bool = True,
                 prior_weight: float = 0.0, decay: float = 0.7, min_q: float = 0.5, width: int = 2,
                 prior_passes: float = math.inf):
        if eviction not in EVICTIONS or prefetch not in PREFETCHES:
            raise ValueError(f"eviction '{eviction}' / prefetch '{prefetch}' unknown; use "
                             f"{' or '.join(EVICTIONS)} / {' or '.join(PREFETCHES)}")
        if not (0.0 <= prior_weight <= 1.0 and 0.0 <= decay < 1.0 and 0.0 <= min_q <= 1.0 and width >= 1
                and prior_passes > 0):
            raise ValueError(f"prior_weight {prior_weight}, decay {decay}, min_q {min_q} must lie in [0, 1] "
                             f"(decay below 1), width {width} be at least 1 and prior_passes {prior_passes} above 0")
        self.eviction, self.prefetch, self.preload = eviction, prefetch, preload
        self.prior_weight, self.decay, self.min_q, self.width = prior_weight, decay, min_q, width
        self.prior_passes = prior_passes
        self.declined = 0

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        m = ctx.model
        self.layers, self.experts = m.num_layers, m.num_experts
        self.prior = np.full((m.num_layers, m.num_experts), m.top_k / m.num_experts)  # uses per pass
        self.recent = self.prior.copy()
        self.last_use = np.zeros((m.num_layers, m.num_experts), dtype=np.int64)
        self.clock, self.now = 0, 0
        self.reach, self.reach_s, self.layer_s = 1, 0.0, 1.0
        if ctx.timing is not None:  # layers one copy takes, so that a prefetch lands before its layer
            self.layer_s = max(ctx.timing.non_expert_s(1) + m.top_k * ctx.timing.expert_s(1), 1e-12)
            self.reach_s = ctx.timing.copy_s(m.bytes_per_expert)
            self.reach = max(1, math.ceil(self.reach_s / self.layer_s))
        self.cooc = np.zeros((self.width, m.num_layers, m.num_experts, m.num_experts), dtype=np.float32)
        self._queued: dict[Block, float] = {}  # prefetch -> q (preloads: -1)
        self._needed: set[Block] = set()
        self.count = np.zeros((m.num_layers, m.num_experts))  # the running request's uses so far
        self.passes = np.zeros(m.num_layers)  # and its passes

    def fit(self, trace: Trace, requests: list[int]) -> None:
        """Uses per pass of each expert and the co-occurrence across layers reach..reach+width-1 ahead."""
        chosen = np.concatenate([trace.experts[o: o + p + d] for o, p, d in map(trace.rows, requests)]).astype(np.intp)
        if not len(chosen):
            return
        n, L, k = chosen.shape
        onehot = np.zeros((n, L, self.experts), dtype=np.float32)
        np.put_along_axis(onehot, chosen, 1.0, axis=-1)
        self.prior = onehot.mean(axis=0)
        self.recent = self.prior.copy()
        for i in range(self.width):
            j = self.reach + i
            for layer in range(L - j):
                together = onehot[:, layer].T @ onehot[:, layer + j]  # [e, e']
                self.cooc[i, layer] = together / np.maximum(onehot[:, layer].sum(axis=0), 1.0)[:, None]

    def use_chance(self, layers: np.ndarray, experts: np.ndarray) -> np.ndarray:
        w, s = self.prior_weight, self.prior_passes
        frequency = self.prior[layers, experts] if math.isinf(s) else \
            (self.count[layers, experts] + s * self.prior[layers, experts]) / (self.passes[layers] + s)
        return w * frequency + (1.0 - w) * self.recent[layers, experts]

    # --- events ---
    def on_request_start(self, request: RequestInfo) -> PrefetchPlan | None:
        self.count[:], self.passes[:] = 0.0, 0.0  # batched requests share one count: their mix's
        return PrefetchPlan(self._preloads()) if self.preload else None

    def on_layer_start(self, step: Step, layer: int, probs: np.ndarray, experts: tuple[int, ...]) -> PrefetchPlan | None:
        self.now, self.clock = layer, self.clock + 1
        chosen = list(experts)
        self.recent[layer] *= self.decay
        self.recent[layer, chosen] += 1.0 - self.decay
        self.last_use[layer, chosen] = self.clock
        self.count[layer, chosen] += 1.0
        self.passes[layer] += 1.0
        self._needed = {(layer, e, 0) for e in chosen}
        if self.prefetch == "none":
            return None
        # This layer's demand copies go first on the link: a prefetch queued now lands after them.
        misses = sum(not self.ctx.cache_of(layer, e).is_resident((layer, e, 0)) for e in chosen)
        first = layer + max(self.reach, math.ceil((misses + 1) * self.reach_s / self.layer_s))
        entries = []
        for k in range(first - layer - self.reach, self.width):  # co-occurrence k layers past the reach
            target = layer + self.reach + k
            if target >= self.layers:
                break
            q = self.cooc[k, layer, chosen].mean(axis=0)
            for e in np.flatnonzero(q >= self.min_q):
                block = (target, int(e), 0)
                if not self.ctx.cache_of(target, int(e)).is_resident(block):
                    entries.append((block, 1.0 + float(q[e])))
        self._queued = {block: priority - 1.0 for block, priority in entries}
        preloads = self._preloads() if self.preload else []
        return PrefetchPlan(entries + preloads, replace=True)

    def _preloads(self) -> list[tuple[Block, float]]:
        """The most used experts not resident, as many as each GPU's free room holds."""
        entries = []
        for gpu, cache in enumerate(self.ctx.caches):
            if cache.free_bytes() < self.ctx.model.bytes_per_expert:
                continue
            for layer in self.ctx.layers_of(gpu):
                for e in np.argsort(-self.prior[layer], kind="stable"):
                    block = (layer, int(e), 0)
                    if self.ctx.home(layer, int(e)) == gpu and not cache.is_resident(block) \
                            and not cache.is_in_flight(block):
                        entries.append((float(self.prior[layer, e]), block, cache.block_bytes(block), gpu))
        entries.sort(key=lambda x: -x[0])
        room = {gpu: cache.free_bytes() for gpu, cache in enumerate(self.ctx.caches)}
        plan = []
        for prior, block, nbytes, gpu in entries:
            if room[gpu] >= nbytes:
                room[gpu] -= nbytes
                plan.append((block, prior * 1e-3))  # below every timely prefetch
                self._queued[block] = -1.0
        return plan

    # --- eviction ---
    def eviction_order(self, incoming: Block, need_bytes: int, cache: CacheView) -> Iterator[Block]:
        if self.eviction == "lru":
            return ranked(cache, lambda layers, experts, parts: (self.last_use[layers, experts],))

        def rank(layers, experts, parts):
            p = np.maximum(self.use_chance(layers, experts), 1e-9)
            until = (layers - self.now - 1) % self.layers + 1 + self.layers * (1.0 - p) / p
            return (-until,)
        return ranked(cache, rank)

    def choose_victims(self, incoming: Block, need_bytes: int, cache: CacheView) -> list[Block] | None:
        victims = super().choose_victims(incoming, need_bytes, cache)
        q = self._queued.get(incoming)
        if victims and q is not None and incoming not in self._needed:
            table = np.asarray(victims, dtype=np.intp)
            p_victims = self.use_chance(table[:, 0], table[:, 1])
            if q < 0 or (p_victims >= q).any():  # a preload never evicts; a prefetch only less likely experts
                self.declined += 1
                return None
        return victims

    def describe(self) -> dict:
        return {"eviction": self.eviction, "prefetch": self.prefetch, "preload": self.preload,
                "prior_weight": self.prior_weight, "decay": self.decay, "min_q": self.min_q, "width": self.width,
                "prior_passes": self.prior_passes,
                "reach_layers": self.reach, "declined_prefetches": self.declined}
