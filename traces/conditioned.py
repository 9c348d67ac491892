"""Prompt-conditioned routing: a new prompt's routing is drawn from the recorded routing of the
training requests whose prompt embeddings are nearest to it.

The model keeps the training requests' decode routing (top-k ids and weights) and their prompt
embeddings. A new request picks its `neighbours` nearest training prompts (cosine of embeddings);
its tokens copy token rows in runs from one neighbour, in order (so token-to-token reuse within a
run is real), and at each token jump with probability `jump` to a random neighbour at a random
position. What the prompt changes is which requests it copies from: prompts of a subject route as
that subject's recorded requests do.

Copied rows alone make routing too predictable: new prompts that share a neighbour share its rows
exactly, so a trajectory search finds perfect matches that real routing of other prompts never
offers (+20-25% trajectory accuracy on splits of the shipped gpt-oss trace). So each (token, layer)
is, with probability `resample`, redrawn from the same layer of another token of its source
request: the one whose experts at the layers above and below overlap this token's most, then
whose overlap with the previous and next tokens' experts at this layer is closest to the copied
row's (random among ties). The redraw keeps what predictors measure locally (layer-to-layer
co-occurrence, token-to-token reuse, the request's expert mix) and makes each token's trajectory
new. `neighbours` and `resample` are fitted on the training requests alone (fit_conditioned: half
of them generate for the other half's prompts; the smallest distance to that half's real routing wins).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NEIGHBOURS = (1, 2)
RESAMPLES = (0.2, 0.3, 0.4)
JUMP = 1 / 16  # splits of the shipped gpt-oss trace: 1/8..1/32 fit alike
_VERTICAL = 16  # an overlap with the layers above and below outranks any reuse mismatch (at most 2k)


@dataclass(frozen=True)
class ConditionedModel:
    segments: list[np.ndarray]   # per training request: experts [tokens, layers, k]
    weights: list[np.ndarray]    # per training request: their weights [tokens, layers, k]
    embeddings: np.ndarray | None  # unit [requests, dim]; None: every request is equally near
    neighbours: int
    jump: float
    resample: float

    def describe(self) -> dict:
        return {"kind": "prompt-conditioned neighbour copy, cells resampled",
                "training_requests": len(self.segments),
                "training_tokens": int(sum(len(s) for s in self.segments)), "neighbours": self.neighbours,
                "jump": self.jump, "resample": self.resample}


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def nearest(model: ConditionedModel, embedding: np.ndarray | None) -> np.ndarray:
    """Indices of the model's `neighbours` training requests nearest the prompt (ties: lower index)."""
    if model.embeddings is None or embedding is None:
        return np.arange(min(model.neighbours, len(model.segments)))
    similarity = model.embeddings @ _unit(embedding)
    return np.argsort(-similarity, kind="stable")[:model.neighbours]


def _overlap(candidates: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """[n] experts each candidate set ([n, k]) shares with one chosen set ([k])."""
    return (candidates[:, :, None] == chosen[None, None, :]).any(axis=-1).sum(axis=-1)


def _resample(model: ConditionedModel, rows: np.ndarray, experts: np.ndarray, weights: np.ndarray,
              rng: np.random.Generator) -> None:
    """Redraw cells of the copied tokens in place (see the module doc); in token-major order, so a
    cell sees the redrawn cells before it."""
    n, layers = experts.shape[:2]
    for t, layer in zip(*np.nonzero(rng.random((n, layers)) < model.resample)):
        source = model.segments[rows[t, 0]]
        score = np.zeros(len(source), dtype=np.int64)
        for other in (layer - 1, layer + 1):
            if 0 <= other < layers:
                score += _overlap(source[:, other], experts[t, other])
        score *= _VERTICAL
        for u in (t - 1, t + 1):
            if 0 <= u < n:
                own = _overlap(experts[t, layer][None], experts[u, layer])[0]
                score -= np.abs(_overlap(source[:, layer], experts[u, layer]) - own)
        score[rows[t, 1]] = np.iinfo(np.int64).min  # never the copied row itself: that changes nothing
        best = np.flatnonzero(score == score.max())
        donor = int(best[rng.integers(len(best))])
        experts[t, layer] = source[donor, layer]
        weights[t, layer] = model.weights[rows[t, 0]][donor, layer]


def sample_request(model: ConditionedModel, embedding: np.ndarray | None, length: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Experts and weights [length, layers, k] of one new request."""
    if length == 0:
        shape = (0,) + model.segments[0].shape[1:]
        return np.zeros(shape, dtype=np.int64), np.zeros(shape, dtype=np.float32)
    sources = nearest(model, embedding)
    rows = np.empty((length, 2), dtype=np.int64)  # (training request, token)
    source, position = int(sources[0]), 0
    for t in range(length):
        if t and rng.random() < model.jump:
            source = int(sources[rng.integers(len(sources))])
            position = int(rng.integers(len(model.segments[source])))
        rows[t] = source, position % len(model.segments[source])
        position += 1
    experts = np.stack([model.segments[s][p] for s, p in rows])
    weights = np.stack([model.weights[s][p] for s, p in rows])
    if len(model.segments[int(sources[0])]) > 1:  # a one-token source has no other row to draw from
        _resample(model, rows, experts, weights, rng)
    return experts, weights


def generate(model: ConditionedModel, embeddings: np.ndarray | None, lengths: np.ndarray,
             seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [sample_request(model, None if embeddings is None else embeddings[i], int(n), rng)
            for i, n in enumerate(lengths)]


def _model(segments, weights, embeddings, neighbours, resample) -> ConditionedModel:
    return ConditionedModel(list(segments), list(weights), None if embeddings is None else _unit(embeddings),
                            neighbours, JUMP, resample)


def fit_conditioned(segments: list[np.ndarray], weights: list[np.ndarray], embeddings: np.ndarray | None,
                    num_experts: int, seed: int = 0) -> ConditionedModel:
    """Keep the training requests; choose `neighbours` and `resample` by the smallest distance of
    routing generated for half of them (odd index, from the even ones) to that half's real routing."""
    from traces.stats import (  # stats measures; imported where used
        realism_distance,
        segment_figures,
    )

    kept = [i for i, s in enumerate(segments) if len(s)]
    segments, weights = [segments[i] for i in kept], [weights[i] for i in kept]
    embeddings = None if embeddings is None else np.asarray(embeddings)[kept]
    if len(segments) < 4:
        # Too few to split: every request is a neighbour of every prompt, and no cell is redrawn:
        # redrawing breaks rows that several new prompts share, and with no held-out part there is
        # no measure of how much (Mixtral leave-one-out: 8.8% with none, 14-17% at 0.1-0.2).
        return _model(segments, weights, embeddings, len(segments), 0.0)
    top_k = segments[0].shape[2]
    train, test = kept_half(len(segments), 0), kept_half(len(segments), 1)
    test_embeddings = None if embeddings is None else embeddings[test]
    real = segment_figures([segments[i] for i in test], test_embeddings, num_experts, top_k)
    best = None
    for neighbours in NEIGHBOURS:
        for resample in RESAMPLES:
            half = _model([segments[i] for i in train], [weights[i] for i in train],
                          None if embeddings is None else embeddings[train], neighbours, resample)
            made = generate(half, test_embeddings, np.array([len(segments[i]) for i in test]), seed)
            distance = realism_distance(segment_figures([m[0] for m in made], test_embeddings, num_experts, top_k),
                                        real)
            if best is None or distance < best[0]:
                best = (distance, neighbours, resample)
    return _model(segments, weights, embeddings, *best[1:])


def training_parts(trace) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray | None]:
    """A trace's per-request decode experts and their weights [tokens, layers, k], and its default
    prompt embeddings (None without): what fit_conditioned keeps."""
    from traces.stats import routing_segments  # as in fit_conditioned: stats loads only where used

    segments = routing_segments(trace)
    weights = []
    for r, seg in enumerate(segments):
        offset, prefill, decode = trace.rows(r)
        rows = slice(offset + prefill, offset + prefill + decode)
        weights.append(np.take_along_axis(np.nan_to_num(trace.probs(rows)), seg, axis=-1).astype(np.float32))
    embeddings = trace.embedding() if trace.meta.default_embedding is not None else None
    return segments, weights, embeddings


def kept_half(n: int, parity: int) -> list[int]:
    return [i for i in range(n) if i % 2 == parity]
