"""FineMoE (Yu et al., EuroSys '26): iteration-level expert maps, semantic and trajectory search.

Each iteration (a decode step; each prompt token of a prefill) leaves an expert map: its full
[layers, experts] router probabilities. A map store of `capacity` maps keeps each with its prompt's
embedding. Before layer 0 of every iteration, semantic search picks the stored map whose embedding
is most cosine-similar to the prompt's; it predicts layers 0..d-1. After each layer l, trajectory
search compares this iteration's probabilities on layers 0..l (flattened) with every stored map's
same layers; the best predicts a window of later layers. In each predicted layer the experts are
taken in descending probability while their cumulative probability stays within delta (at least
top-k, at most all). A full store replaces the stored map of highest redundancy
RDY = (d/L) * semantic similarity + ((L-d)/L) * trajectory similarity.

Point by point against the artifact, github IntelliSys-Lab/FineMoE-EuroSys26 @5c58468:
- capacity 1000, d = 6: demo/configs/models/config_qwen.py (store_capacity, prefetch_distance).
- Selection, finemoe/runtime/model_offload.py ExpertMapMatcher._select_by_cumsum: delta =
  clamp(1 - similarity, 0, 1), experts counted while cumsum <= delta, clamped to [top_k, E]. The
  artifact's maps are full softmax rows (they sum to 1); a trace that keeps only top-m
  probabilities stores rows of mass M < 1, on which the rule verbatim selects all E experts
  whenever delta > M. Here each row is completed first: unknown probabilities (NaN) share the
  unrecorded mass 1 - M equally, and the row is scaled to sum 1, so the rule sees what the artifact
  sees on full maps (an unknown probability is never read as zero).
- Window, model_offload.py traj_prefetch: after layer l it predicts layers l+1+d..L-1
  (layer_start = observed layers + d, layer_end = L); embed_prefetch predicts 0..d-1. The paper
  describes l+1..l+d; trajectory_window="artifact" (default) or "paper".
- Enqueue, model_offload.py process_expert_map + finemoe/memory/expert_prefetcher.py
  prefetch_experts: priority = selected p * (1 - (j - start) / (end + 1)) + 1e-6 over every expert
  of the window, so every expert of the window is enqueued (unselected ones at 1e-6, last), in
  priority order, and every enqueued expert becomes a cache candidate (replace_cache_candidates);
  each enqueue sets the expert's prob to its matched-map probability
  (core/prefetch/archer_prefetch_handle.cpp EnqueuePrefetch, node->prob = prob). prefetch="artifact"
  (default); prefetch="paper" enqueues and protects only the selected experts at p / (j - l).
- Eviction, core/prefetch/task_scheduler.cpp RemoveCachedSparseNode: ascending
  size_t(prob * incache_visit_count) (a truncated integer: with probabilities below 1 a once-used
  expert scores 0), skipping candidates, and an evicted expert's prob and count reset to 0; the
  count is 1 after a copy (task_scheduler.cpp, the copy thread's incache_visit_count += 1) and
  grows with every use while resident (StartExec). eviction="artifact" (default) or "float"
  (the untruncated product, the paper's p x freq).
- Placement, core/model/model_topology.cpp InitializeTopology: experts round-robin over all GPUs
  in (layer, expert) order; the simulator's placement=round_robin (sim.topology), which
  sim.reproduce uses for FineMoE on the multi-GPU testbed.
- RDY replacement and its batch semantics: model_offload.py, ExpertMapStore.add.
- The store is filled from earlier runs (demo/prepare_data.py) and, in "online" mode, keeps
  adding every finished iteration (finemoe/memory/expert_tracer.py, update_entry): fit() does the
  former on the training split, online=True the latter.
Defaults are the artifact's wherever it departs from the paper: its code is what produced the
paper's figures. The artifact embeds each token with the model's own input embedding; traces
carry one embedding per prompt, so every iteration of a request searches with its prompt's:
`embedding` names which of the trace's; by default the mean of the model's input embeddings over
the prompt ("token_mean", as traces.collect records it) when the trace has it, else the trace's
default embedding. Ties between equally similar maps (every iteration of one request shares an
embedding) go to the most recent. Prefills match on their last prompt token's trajectory, as the
artifact does.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from policies.base import (Block, CacheView, Policy, PolicyContext, PrefetchPlan, RequestInfo, Step, known_probs,
                           layer_known_probs)
from policies.registry import register
from policies.matching import EPS, MapAccuracy, best_match, union_plan, unit
from policies.victims import ranked
from traces import Trace

WINDOWS = ("paper", "artifact")
PREFETCHES = ("artifact", "paper")
EVICTIONS = ("artifact", "float")
ENQUEUE_FLOOR = 1e-6  # process_expert_map: every expert of the window gets at least this priority
# The artifact embeds with the model's own input embeddings (modeling_qwen2_moe.py, embed_prefetch of
# inputs_embeds); traces.collect records their mean over the prompt under this name.
ARTIFACT_EMBEDDING = "token_mean"


def complete(expert_map: np.ndarray) -> np.ndarray:
    """A map's rows as full distributions: unknown (NaN) probabilities share the unrecorded mass
    equally, and each row is scaled to sum 1 (the artifact's maps are full softmax rows)."""
    unknown = np.isnan(expert_map)
    rows = expert_map
    if unknown.any():
        rows = np.where(unknown, np.float32(0.0), expert_map)
        rest = np.maximum(1.0 - rows.sum(axis=-1, keepdims=True), 0.0)  # np.clip's own call, unwrapped
        share = rest / np.maximum(unknown.sum(axis=-1, keepdims=True), 1)
        rows = np.where(unknown, share, rows)
    return normalised(rows)


def normalised(rows: np.ndarray) -> np.ndarray:
    """Rows without unknown probabilities scaled to sum 1 (all-zero rows stay zero), as float32."""
    total = rows.sum(axis=-1, keepdims=True)
    return np.divide(rows, total, out=np.zeros_like(rows), where=total > 0).astype(np.float32, copy=False)


class ExpertMapStore:
    """At most `capacity` expert maps [layers, experts] with their prompt embeddings, deduplicated by RDY."""

    def __init__(self, capacity: int, layers: int, experts: int, distance: int):
        self.capacity = capacity
        self.maps = np.zeros((capacity, layers, experts), dtype=np.float32)
        # Each stored map's rows ranked once, as selection reads them: expert order (descending
        # probability, stable), the probabilities in that order and their running sums.
        self.order = np.zeros((capacity, layers, experts), dtype=np.int64)
        self.ranked = np.zeros((capacity, layers, experts), dtype=np.float32)
        self.cumulative = np.zeros((capacity, layers, experts), dtype=np.float32)
        self.prefix_sq = np.zeros((capacity, layers), dtype=np.float32)  # squared norm of layers 0..l
        self.embeds: np.ndarray | None = None  # unit vectors, allocated on the first embedding
        self.stamps = np.zeros(capacity, dtype=np.int64)
        self.size = 0
        self._clock = 0
        self.semantic_weight = distance / layers

    def add(self, maps: np.ndarray, embed: np.ndarray | None) -> None:
        """Store maps [n, layers, experts] of one prompt (completed rows): free slots first, then each replaces the
        stored map of highest RDY against the store as it was before this batch's replacements."""
        maps = complete(maps)
        n = len(maps)
        take = min(self.capacity - self.size, n)
        slots = list(range(self.size, self.size + take))
        self.size += take
        rest = maps[take:]
        if len(rest):
            flat = self.maps[: self.size].reshape(self.size, -1)
            trajectory = unit(rest.reshape(len(rest), -1)) @ unit(flat).T
            semantic = self.embeds[: self.size] @ embed if embed is not None and self.embeds is not None else 0.0
            redundancy = self.semantic_weight * semantic + (1.0 - self.semantic_weight) * trajectory
            slots += np.argmax(redundancy, axis=1).tolist()
        for slot, expert_map in zip(slots, maps):
            self.maps[slot] = expert_map
            self.order[slot] = np.argsort(-expert_map, axis=1, kind="stable")
            self.ranked[slot] = np.take_along_axis(expert_map, self.order[slot], axis=1)
            self.cumulative[slot] = np.cumsum(self.ranked[slot], axis=1)
            self.prefix_sq[slot] = np.cumsum(np.einsum("le,le->l", expert_map, expert_map))
            if embed is not None:
                if self.embeds is None:
                    self.embeds = np.zeros((self.capacity, len(embed)), dtype=np.float32)
                self.embeds[slot] = embed
            self._clock += 1
            self.stamps[slot] = self._clock

    def semantic_search(self, embed: np.ndarray) -> tuple[int, float] | None:
        if self.size == 0 or self.embeds is None:
            return None
        similarity = self.embeds[: self.size] @ embed
        best = best_match(similarity, self.stamps[: self.size])
        return best, float(similarity[best])


@register("finemoe")
class FineMoE(Policy):
    def __init__(self, capacity: int = 1000, distance: int = 6, delta: float | None = None,
                 embedding: str | None = None, trajectory_window: str = "artifact", online: bool = True,
                 prefetch: str = "artifact", eviction: str = "artifact"):
        if capacity < 1 or distance < 1:
            raise ValueError(f"capacity ({capacity}) and distance ({distance}) must be at least 1")
        if delta is not None and not 0.0 <= delta <= 1.0:
            raise ValueError(f"delta {delta} must lie in [0, 1] (or be None: 1 - similarity, as the artifact)")
        if trajectory_window not in WINDOWS:
            raise ValueError(f"trajectory_window '{trajectory_window}' unknown; use {' or '.join(WINDOWS)}")
        if prefetch not in PREFETCHES or eviction not in EVICTIONS:
            raise ValueError(f"prefetch '{prefetch}' / eviction '{eviction}' unknown; use "
                             f"{' or '.join(PREFETCHES)} / {' or '.join(EVICTIONS)}")
        self.capacity, self.distance, self.delta = capacity, distance, delta
        self.prefetch, self.eviction = prefetch, eviction
        self.embedding, self.trajectory_window, self.online = embedding, trajectory_window, online
        self.searches = {"semantic": 0, "trajectory": 0}
        self.map_accuracy = MapAccuracy()

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        m = ctx.model
        self.layers, self.experts, self.top_k = m.num_layers, m.num_experts, m.top_k
        self.store = ExpertMapStore(self.capacity, m.num_layers, m.num_experts, self.distance)
        self.prob = np.zeros((m.num_layers, m.num_experts), dtype=np.float32)  # latest prediction
        self.predicted = self.prob.copy()  # the same, not reset on eviction
        self.freq = np.zeros((m.num_layers, m.num_experts), dtype=np.int64)  # uses since loaded
        self.candidates = np.zeros((m.num_layers, m.num_experts), dtype=bool)  # the latest prefetch plan's
        self._embeds: dict[int, np.ndarray | None] = {}  # running request -> unit prompt embedding
        self._columns = np.arange(m.num_experts)[None, :]
        self._layer_of = np.repeat(np.arange(m.num_layers), m.num_experts).reshape(m.num_layers, m.num_experts)
        self._decays: dict[tuple[int, int], np.ndarray] = {}

    def embedding_source(self, available: list[str]) -> str | None:
        if self.embedding is None and ARTIFACT_EMBEDDING in available:
            return ARTIFACT_EMBEDDING
        return self.embedding

    def fit(self, trace: Trace, requests: list[int]) -> None:
        """Fill the store with the training split's maps, as the artifact's prepare_data run does."""
        embeddings = trace.embedding(self.embedding_source(trace.embedding_names))
        for r in requests:
            offset, prefill, decode = trace.rows(r)
            embed = None if embeddings is None or np.isnan(embeddings[r]).any() else unit(embeddings[r])
            self.store.add(known_probs(trace.probs(slice(offset, offset + prefill + decode))), embed)

    # --- prediction ---
    def _predict(self, slot: int, similarity: float, first: int, last: int,
                 now: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Prefetches (layers, experts, priorities) for layers first..last-1 of the stored map in
        `slot`, layer by layer and each in ranked order: the artifact's whole window at
        p_selected * decay + 1e-6, or the paper's selected experts at p / (j - now)."""
        store = self.store
        order, ranked = store.order[slot, first:last], store.ranked[slot, first:last]
        delta = min(max(1.0 - similarity, 0.0), 1.0) if self.delta is None else self.delta
        counts = np.minimum(np.maximum((store.cumulative[slot, first:last] <= delta).sum(axis=1), self.top_k),
                            self.experts)  # clamped to [top_k, E] (np.clip, without its Python wrapper)
        counts[ranked[:, 0] <= 0] = 0
        selected = self._columns < counts[:, None]  # in ranked order
        layers = self._layer_of[first:last]
        if self.prefetch == "paper":
            distance = (layers - now).astype(np.float64)
            return layers[selected], order[selected], ranked[selected].astype(np.float64) / distance[selected]
        priority = np.where(selected, ranked * self._decay(first, last)[:, None], 0.0) + ENQUEUE_FLOOR
        return layers.ravel(), order.ravel(), priority.ravel()

    def _decay(self, first: int, last: int) -> np.ndarray:
        """The artifact's priority decay over layers first..last-1, 1 - (j - first) / (last + 1)."""
        decay = self._decays.get((first, last))
        if decay is None:
            decay = self._decays[first, last] = 1.0 - np.arange(last - first) / (last + 1)
        return decay

    def _plan(self, matched: list[np.ndarray], predictions: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
              first: int, last: int) -> PrefetchPlan | None:
        """The batch's prefetches, enqueued in priority order (expert_prefetcher.py); the predicted
        probabilities of layers first..last-1 become the matched maps' (the highest over the batch),
        for eviction."""
        if not matched:
            return None
        self.prob[first:last] = matched[0][first:last] if len(matched) == 1 else \
            np.max([m[first:last] for m in matched], axis=0)
        self.predicted[first:last] = self.prob[first:last]
        layers, experts, priorities = predictions[0] if len(predictions) == 1 else \
            (np.concatenate(column) for column in zip(*predictions))
        self.candidates[:] = False
        self.candidates[layers, experts] = True
        return union_plan(layers, experts, priorities, distinct=len(predictions) == 1)

    def on_request_start(self, request: RequestInfo) -> None:
        self._embeds[request.index] = None if request.embedding is None else unit(request.embedding)

    def on_request_end(self, request: RequestInfo) -> None:
        del self._embeds[request.index]

    def on_step_start(self, step: Step) -> PrefetchPlan | None:
        # One trajectory per request of the pass: a decode row each; a prefill matches on its last token.
        self._rows = [len(step.token_request) - 1] if step.kind == "prefill" else list(range(len(step.token_request)))
        self._row_embeds = [self._embeds[step.requests[step.token_request[r]]] for r in self._rows]
        self._current = np.zeros((len(self._rows), self.layers, self.experts), dtype=np.float32)
        self._prefill_rows: list[np.ndarray] = []
        self._dot = np.zeros((len(self._rows), self.store.size), dtype=np.float32)
        self._current_sq = np.zeros(len(self._rows), dtype=np.float32)
        last = min(self.distance, self.layers)
        matched, predictions = [], []
        for embed in (self._embeds[r] for r in dict.fromkeys(step.requests)):
            match = None if embed is None else self.store.semantic_search(embed)
            if match is not None:
                self.searches["semantic"] += 1
                matched.append(self.store.maps[match[0]])
                predictions.append(self._predict(match[0], match[1], 0, last, -1))
        return self._plan(matched, predictions, 0, last)

    def on_layer_start(self, step: Step, layer: int, probs: np.ndarray, experts: tuple[int, ...]) -> PrefetchPlan | None:
        self.freq[layer, list(experts)] += 1
        self.map_accuracy.observe(self.predicted[layer], experts)  # eviction resets prob, not this
        probs = layer_known_probs(step, layer, probs)  # unknown probabilities (topm traces): policies.base's estimate, not 0
        rows = normalised(probs[self._rows])  # (known_probs left no unknown)
        self._current[:, layer] = rows
        if step.kind == "prefill" and len(probs) > 1:
            self._prefill_rows.append(normalised(probs))
        store = self.store
        first = layer + 1 + (self.distance if self.trajectory_window == "artifact" else 0)
        last = self.layers if self.trajectory_window == "artifact" else min(layer + 1 + self.distance, self.layers)
        if store.size == 0:
            return None
        self._dot += rows @ store.maps[: store.size, layer].T
        self._current_sq += np.einsum("re,re->r", rows, rows)
        if first >= last:
            return None
        norms = np.sqrt(np.outer(self._current_sq, store.prefix_sq[: store.size, layer]))
        similarity = self._dot / np.maximum(norms, EPS)
        matched, predictions = [], []
        for row_similarity in similarity:
            best = best_match(row_similarity, store.stamps[: store.size])
            self.searches["trajectory"] += 1
            matched.append(store.maps[best])
            predictions.append(self._predict(best, float(row_similarity[best]), first, last, layer))
        return self._plan(matched, predictions, first, last)

    def on_step_end(self, step: Step) -> None:
        if not self.online:
            return
        if self._prefill_rows:  # a prefill with per-token rows: one map per prompt token
            self.store.add(np.stack(self._prefill_rows, axis=1), self._row_embeds[0])
            return
        for current, embed in zip(self._current, self._row_embeds):
            self.store.add(current[None], embed)

    # --- eviction ---
    def on_copy_done(self, block: Block, prefetched: bool) -> None:
        self.freq[block[0], block[1]] = 1

    def eviction_order(self, incoming: Block, need_bytes: int, cache: CacheView) -> Iterator[Block]:
        def rank(layers, experts, parts):
            flat = layers * self.experts + experts  # one index into the [layers, experts] arrays
            score = self.prob.ravel()[flat] * self.freq.ravel()[flat]
            return self.candidates.ravel()[flat], np.floor(score) if self.eviction == "artifact" else score
        return ranked(cache, rank)

    def choose_victims(self, incoming: Block, need_bytes: int, cache: CacheView) -> list[Block]:
        victims = super().choose_victims(incoming, need_bytes, cache)
        for layer, expert, _ in victims:
            self.freq[layer, expert] = 0
            if self.eviction == "artifact":  # RemoveCachedSparseNode: n->prob = 0
                self.prob[layer, expert] = 0.0
        return victims

    def describe(self) -> dict:
        return {"capacity": self.capacity, "distance": self.distance, "trajectory_window": self.trajectory_window,
                "prefetch": self.prefetch, "eviction": self.eviction,
                "delta": "1 - similarity" if self.delta is None else self.delta, "online": self.online,
                "stored_maps": self.store.size, "semantic_searches": self.searches["semantic"],
                "trajectory_searches": self.searches["trajectory"],
                "map_accuracy": self.map_accuracy.value}
