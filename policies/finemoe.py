"""FineMoE (Yu et al., EuroSys '26): iteration-level expert maps, semantic and trajectory search.

Each iteration (a decode step; each prompt token of a prefill) leaves an expert map: its full
[layers, experts] router probabilities. A map store of `capacity` maps keeps each with its prompt's
embedding. Before layer 0 of every iteration, semantic search picks the stored map whose embedding
is most cosine-similar to the prompt's; it predicts layers 0..d-1. After each layer l, trajectory
search compares this iteration's probabilities on layers 0..l (flattened) with every stored map's
same layers; the best predicts layers l+1..l+d. In each predicted layer the experts are taken in
descending probability while their cumulative probability stays within delta (at least top-k, at
most all) and prefetched at priority p / (j - l_now), replacing the queue. Eviction removes the
lowest p * freq first (p: the latest predicted probability of the expert, freq: its uses since it
was loaded; ties, common when maps hold only top-k probabilities, in layer and expert order),
sparing the latest prefetch candidates. A full store replaces the stored map of
highest redundancy RDY = (d/L) * semantic similarity + ((L-d)/L) * trajectory similarity.

Defaults and rules from the artifact, github IntelliSys-Lab/FineMoE-EuroSys26 @5c58468:
- capacity 1000, d = 6: demo/configs/models/config_qwen.py (store_capacity, prefetch_distance);
- delta = clamp(1 - similarity, 0, 1), experts counted while cumsum <= delta, clamped to
  [top_k, E]: finemoe/runtime/model_offload.py, ExpertMapMatcher.process_expert_map/_select_by_cumsum;
- RDY replacement and its batch semantics: model_offload.py, ExpertMapStore.add;
- eviction by prob * in-cache visit count, sparing prefetch candidates:
  core/prefetch/task_scheduler.cpp, RemoveCachedSparseNode;
- the store is filled from earlier runs (demo/prepare_data.py) and, in "online" mode, keeps
  adding every finished iteration (finemoe/memory/expert_tracer.py, update_entry): fit() does the
  former on the training split, online=True the latter.
Where the artifact departs from the paper, the paper's rule is the default and the artifact's a
knob: trajectory_window="artifact" predicts layers l+1+d..L-1 (model_offload.py traj_prefetch)
instead of l+1..l+d. The artifact embeds each token with the model's own input embedding; traces
carry one embedding per prompt, so every iteration of a request searches with its prompt's:
`embedding` names which of the trace's; by default the mean of the model's input embeddings over
the prompt ("token_mean", as traces.collect records it) when the trace has it, else the trace's
default embedding. Ties between
equally similar maps (every iteration of one request shares an embedding) go to the most recent.
Prefills match on their last prompt token's trajectory, as the artifact does.
"""
from __future__ import annotations

import numpy as np

from policies.base import Block, CacheView, Policy, PolicyContext, PrefetchPlan, RequestInfo, Step, known_probs
from policies.registry import register
from policies.matching import EPS, best_match, union_plan, unit
from policies.victims import lowest_ranked
from traces import Trace

WINDOWS = ("paper", "artifact")
# The artifact embeds with the model's own input embeddings (modeling_qwen2_moe.py, embed_prefetch of
# inputs_embeds); traces.collect records their mean over the prompt under this name.
ARTIFACT_EMBEDDING = "token_mean"


class ExpertMapStore:
    """At most `capacity` expert maps [layers, experts] with their prompt embeddings, deduplicated by RDY."""

    def __init__(self, capacity: int, layers: int, experts: int, distance: int):
        self.capacity = capacity
        self.maps = np.zeros((capacity, layers, experts), dtype=np.float32)
        self.prefix_sq = np.zeros((capacity, layers), dtype=np.float32)  # squared norm of layers 0..l
        self.embeds: np.ndarray | None = None  # unit vectors, allocated on the first embedding
        self.stamps = np.zeros(capacity, dtype=np.int64)
        self.size = 0
        self._clock = 0
        self.semantic_weight = distance / layers

    def add(self, maps: np.ndarray, embed: np.ndarray | None) -> None:
        """Store maps [n, layers, experts] of one prompt: free slots first, then each replaces the
        stored map of highest RDY against the store as it was before this batch's replacements."""
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
                 embedding: str | None = None, trajectory_window: str = "paper", online: bool = True):
        if capacity < 1 or distance < 1:
            raise ValueError(f"capacity ({capacity}) and distance ({distance}) must be at least 1")
        if delta is not None and not 0.0 <= delta <= 1.0:
            raise ValueError(f"delta {delta} must lie in [0, 1] (or be None: 1 - similarity, as the artifact)")
        if trajectory_window not in WINDOWS:
            raise ValueError(f"trajectory_window '{trajectory_window}' unknown; use {' or '.join(WINDOWS)}")
        self.capacity, self.distance, self.delta = capacity, distance, delta
        self.embedding, self.trajectory_window, self.online = embedding, trajectory_window, online
        self.searches = {"semantic": 0, "trajectory": 0}

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        m = ctx.model
        self.layers, self.experts, self.top_k = m.num_layers, m.num_experts, m.top_k
        self.store = ExpertMapStore(self.capacity, m.num_layers, m.num_experts, self.distance)
        self.prob = np.zeros((m.num_layers, m.num_experts), dtype=np.float32)  # latest prediction
        self.freq = np.zeros((m.num_layers, m.num_experts), dtype=np.int64)  # uses since loaded
        self.candidates = np.zeros((m.num_layers, m.num_experts), dtype=bool)  # the latest prefetch plan's
        self._embeds: dict[int, np.ndarray | None] = {}  # running request -> unit prompt embedding

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
    def _predict(self, expert_map: np.ndarray, similarity: float, first: int, last: int,
                 now: int) -> list[tuple[Block, float]]:
        """The selected experts of layers first..last-1 of a matched map, at priority p / (j - now)."""
        rows = expert_map[first:last]
        order = np.argsort(-rows, axis=1, kind="stable")
        ranked = np.take_along_axis(rows, order, axis=1)
        delta = min(max(1.0 - similarity, 0.0), 1.0) if self.delta is None else self.delta
        counts = np.clip((np.cumsum(ranked, axis=1) <= delta).sum(axis=1), self.top_k, self.experts)
        counts[ranked[:, 0] <= 0] = 0
        return [((first + i, int(e), 0), float(rows[i, e]) / (first + i - now))
                for i in range(len(rows)) for e in order[i, : counts[i]]]

    def _plan(self, matched: list[np.ndarray], predictions: list[list[tuple[Block, float]]], first: int,
              last: int) -> PrefetchPlan | None:
        """The batch's prefetches; the predicted probabilities of layers first..last-1 become the
        matched maps' (the highest over the batch), for eviction."""
        if not matched:
            return None
        self.prob[first:last] = matched[0][first:last] if len(matched) == 1 else \
            np.max([m[first:last] for m in matched], axis=0)
        plan = union_plan(predictions)
        self.candidates[:] = False
        for (layer, expert, _), _ in plan.blocks:
            self.candidates[layer, expert] = True
        return plan

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
                predictions.append(self._predict(matched[-1], match[1], 0, last, -1))
        return self._plan(matched, predictions, 0, last)

    def on_layer_start(self, step: Step, layer: int, probs: np.ndarray, experts: tuple[int, ...]) -> PrefetchPlan | None:
        self.freq[layer, list(experts)] += 1
        probs = known_probs(probs)  # unknown probabilities (topm traces): policies.base's estimate, not 0
        rows = probs[self._rows]
        self._current[:, layer] = rows
        if step.kind == "prefill" and len(probs) > 1:
            self._prefill_rows.append(probs)
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
            predictions.append(self._predict(matched[-1], float(row_similarity[best]), first, last, layer))
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

    def choose_victims(self, incoming: Block, need_bytes: int, cache: CacheView) -> list[Block]:
        def rank(layers, experts, parts):
            return self.candidates[layers, experts], self.prob[layers, experts] * self.freq[layers, experts]

        victims = lowest_ranked(cache, need_bytes, rank)
        for layer, expert, _ in victims:
            self.freq[layer, expert] = 0
        return victims

    def describe(self) -> dict:
        return {"capacity": self.capacity, "distance": self.distance, "trajectory_window": self.trajectory_window,
                "delta": "1 - similarity" if self.delta is None else self.delta, "online": self.online,
                "stored_maps": self.store.size, "semantic_searches": self.searches["semantic"],
                "trajectory_searches": self.searches["trajectory"]}
