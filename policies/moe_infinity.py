"""MoE-Infinity (Xue et al.): request-level expert activation matrices matched layer by layer.

Each request builds an expert activation matrix (EAM): [layers, experts] counts of the tokens that
used each expert, prefill and decode together. A collection (EAMC) of `capacity` EAMs keeps past
requests'; when full, a new EAM replaces the stored one most similar to it. After each layer l the
request's partial EAM is matched against every stored one: similarity is the mean, over layers
0..l, of the cosine between corresponding rows. The best match predicts the layers after l:
(r, e) scores match[r, e] / sum(match[r]) * (1 - (r - l) / (L + 1)), and every positive score is
queued for prefetch in score order (at most as many as the cache holds), replacing the queue. Demand loads preempt prefetches (the
engine). Eviction removes the lowest predicted score first, then the least activated expert.

Defaults from github EfficientMoE/MoE-Infinity @d617801: capacity 1000
(moe_infinity/utils/config.py, trace_capacity); the decay (moe_infinity/memory/expert_predictor.py,
layer_decay_func). The public code departs from the paper in three places, each a knob here:
replacement="least_used" replaces the least matched EAM (memory/expert_tracer.py, finish_entry);
eviction="lfu" evicts the resident expert of lowest activation count, as the public code's demand
path does (core/parallel/expert_dispatcher.cpp, GPUFetchFunc: the minimum incache_visit_count,
which grows by one per dispatch and is never cleared: the clear_expert_cache_counts call in
moe_infinity/entrypoints/big_modeling.py, generate, sits after its return). The prefetch path's
RemoveCachedSparseNode (core/prefetch/task_scheduler.cpp) sorts by that count descending, evicting
the most used first; read as a slip, it is not reproduced. Its matching masks the observed layers it should compare (expert_tracer.py,
find_most_similar), which makes every stored EAM equally similar; that is not reproduced.
fit() fills the collection with the training split's EAMs (the code's load_trace).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from policies.base import Block, CacheView, Policy, PolicyContext, PrefetchPlan, RequestInfo, Step
from policies.registry import register
from policies.matching import MapAccuracy, best_match, union_plan, unit
from policies.victims import ranked
from traces import Trace
from traces.format import tally_experts, top_k_experts

REPLACEMENTS = ("most_similar", "least_used")
EVICTIONS = ("score", "lfu")


def pass_counts(step: Step, probs: np.ndarray, experts: tuple[int, ...], top_k: int, prompt_tokens: int) -> np.ndarray:
    """Tokens of one request's rows of a pass that chose each expert at one layer."""
    counts = np.zeros(probs.shape[1], dtype=np.float32)
    if step.kind == "decode" and len(step.requests) == 1:  # one token: the experts it ran
        counts[list(experts)] = 1.0
    elif step.kind == "prefill" and len(probs) == 1:  # a prefill known by counts: probs are normalised counts
        counts += probs[0] * prompt_tokens * top_k
    else:  # per-token rows: each token's top-k (unknown probabilities are NaN and rank last)
        np.add.at(counts, top_k_experts(probs, top_k).ravel(), 1.0)
    return counts


@register("moe_infinity")
class MoEInfinity(Policy):
    def __init__(self, capacity: int = 1000, replacement: str = "most_similar", eviction: str = "score"):
        if capacity < 1:
            raise ValueError(f"capacity {capacity} must be at least 1")
        if replacement not in REPLACEMENTS:
            raise ValueError(f"replacement '{replacement}' unknown; use {' or '.join(REPLACEMENTS)}")
        if eviction not in EVICTIONS:
            raise ValueError(f"eviction '{eviction}' unknown; use {' or '.join(EVICTIONS)}")
        self.capacity, self.replacement, self.eviction = capacity, replacement, eviction

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        m = ctx.model
        self.layers, self.top_k = m.num_layers, m.top_k
        self.collection = np.zeros((self.capacity, m.num_layers, m.num_experts), dtype=np.float32)  # unit rows
        self.matched = np.zeros(self.capacity, dtype=np.int64)  # times each EAM was the best match
        self.stamps = np.zeros(self.capacity, dtype=np.int64)
        self.size = 0
        self._clock = 0
        self.score = np.zeros((m.num_layers, m.num_experts), dtype=np.float32)  # latest prediction
        self.activations = np.zeros((m.num_layers, m.num_experts), dtype=np.int64)
        self.map_accuracy = MapAccuracy()
        self._eams: dict[int, np.ndarray] = {}  # running request -> its EAM so far
        self._row_cos: dict[int, np.ndarray] = {}  # running request -> [stored EAM, layer] row cosines
        self._prompt_tokens: dict[int, int] = {}
        self._slots = sum(int(c.capacity_bytes // m.bytes_per_expert) for c in ctx.caches)
        # after layer l, layer r's scores decay by 1 - (r - l) / (L + 1): one column per l, made once
        self._decays = [(1.0 - (np.arange(layer + 1, m.num_layers) - layer) / (m.num_layers + 1))[:, None]
                        for layer in range(m.num_layers)]

    def fit(self, trace: Trace, requests: list[int]) -> None:
        for r in requests:
            offset, prefill, decode = trace.rows(r)
            eam = tally_experts(trace.experts[offset + prefill: offset + prefill + decode], trace.model.num_experts)
            self._store(eam.astype(np.float32) + trace.prefill_counts[r])

    def _store(self, eam: np.ndarray) -> None:
        rows = unit(eam)
        if self.size < self.capacity:
            slot = self.size
            self.size += 1
        elif self.replacement == "most_similar":
            similarity = np.einsum("cle,le->c", self.collection, rows) / self.layers
            slot = best_match(similarity, self.stamps)
        else:
            slot = int(np.argmin(self.matched))
        self.collection[slot] = rows
        self.matched[slot] = 0
        self._clock += 1
        self.stamps[slot] = self._clock
        for r, eam in self._eams.items():  # running requests compare against the new entry from now on
            self._row_cos[r][slot] = np.einsum("le,le->l", rows, unit(eam))

    def on_request_start(self, request: RequestInfo) -> None:
        self._eams[request.index] = np.zeros((self.layers, self.collection.shape[2]), dtype=np.float32)
        self._row_cos[request.index] = np.zeros((self.capacity, self.layers), dtype=np.float32)
        self._prompt_tokens[request.index] = request.prompt_tokens

    def on_request_end(self, request: RequestInfo) -> None:
        self._store(self._eams.pop(request.index))
        del self._row_cos[request.index], self._prompt_tokens[request.index]

    def _predict(self, request: int, layer: int) -> np.ndarray:
        """Decayed scores [layers, experts] of the stored EAM best matching the request's layers 0..layer."""
        n = self.size
        row_cos = self._row_cos[request]
        row_cos[:n, layer] = self.collection[:n, layer] @ unit(self._eams[request][layer])
        # the mean over layers 0..layer as ndarray.mean computes it (a float32 sum divided by the
        # count as an intp), without its Python wrapper
        similarity = np.add.reduce(row_cos[:n, : layer + 1], axis=1)
        np.true_divide(similarity, np.intp(layer + 1), out=similarity, casting="unsafe")
        best = best_match(similarity, self.stamps[:n])
        self.matched[best] += 1
        match = self.collection[best, layer + 1:]
        totals = match.sum(axis=1, keepdims=True)
        score = np.zeros_like(self.score)
        score[layer + 1:] = np.divide(match, totals, out=np.zeros_like(match), where=totals > 0) * self._decays[layer]
        return score

    def on_layer_start(self, step: Step, layer: int, probs: np.ndarray, experts: tuple[int, ...]) -> PrefetchPlan | None:
        self.activations[layer, list(experts)] += 1
        self.map_accuracy.observe(self.score[layer], experts)
        requests = step.requests
        for position, r in enumerate(requests):
            rows = probs if len(requests) == 1 else probs[step.token_request == position]
            self._eams[r][layer] += pass_counts(step, rows, experts, self.top_k, self._prompt_tokens[r])
        if self.size == 0:
            return None
        self.score = self._predict(requests[0], layer) if len(requests) == 1 else \
            np.max([self._predict(r, layer) for r in requests], axis=0)
        rows, cols = np.nonzero(self.score)
        # In score order, ties by block; the queue never needs more than the caches hold (it is
        # replaced after the next layer anyway). One score per block: none repeats.
        return union_plan(rows, cols, self.score[rows, cols], limit=self._slots, distinct=True)

    def eviction_order(self, incoming: Block, need_bytes: int, cache: CacheView) -> Iterator[Block]:
        def rank(layers, experts, parts):
            flat = layers * self.score.shape[1] + experts  # one index into the [layers, experts] arrays
            count = self.activations.ravel()[flat]
            return (count,) if self.eviction == "lfu" else (self.score.ravel()[flat], count)
        return ranked(cache, rank)

    def describe(self) -> dict:
        return {"capacity": self.capacity, "replacement": self.replacement, "eviction": self.eviction,
                "stored_eams": self.size,
                "map_accuracy": self.map_accuracy.value}
