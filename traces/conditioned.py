"""Prompt-conditioned routing: a new prompt's routing is drawn from the recorded routing of the
training requests whose prompt embeddings are nearest to it.

The model keeps the training requests' decode routing (top-k ids and weights) and their prompt
embeddings. A new request picks its `neighbours` nearest training prompts (cosine of embeddings);
its tokens copy whole token rows (every layer's experts and weights at once, so the cross-layer
structure a trajectory search exploits is real) in runs from one neighbour, in order (so
token-to-token reuse within a run is real), and at each token jumps with probability `jump` to a
random neighbour at a random position. What the prompt changes is which requests it copies from:
prompts of a subject route as that subject's recorded requests do. `neighbours` and `jump` are
fitted on the training requests alone (fit_conditioned: half of them generate for the other half's
prompts, and the pair with the smallest distance to that half's real routing wins).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NEIGHBOURS = (1, 2, 4, 8)
JUMPS = (1 / 4, 1 / 16, 1 / 64)


@dataclass(frozen=True)
class ConditionedModel:
    segments: list[np.ndarray]   # per training request: experts [tokens, layers, k]
    weights: list[np.ndarray]    # per training request: their weights [tokens, layers, k]
    embeddings: np.ndarray | None  # unit [requests, dim]; None: every request is equally near
    neighbours: int
    jump: float

    def describe(self) -> dict:
        return {"kind": "prompt-conditioned neighbour copy", "training_requests": len(self.segments),
                "training_tokens": int(sum(len(s) for s in self.segments)), "neighbours": self.neighbours,
                "jump": self.jump}


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def nearest(model: ConditionedModel, embedding: np.ndarray | None) -> np.ndarray:
    """Indices of the model's `neighbours` training requests nearest the prompt (ties: lower index)."""
    if model.embeddings is None or embedding is None:
        return np.arange(min(model.neighbours, len(model.segments)))
    similarity = model.embeddings @ _unit(embedding)
    return np.argsort(-similarity, kind="stable")[:model.neighbours]


def sample_request(model: ConditionedModel, embedding: np.ndarray | None, length: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Experts and weights [length, layers, k] of one new request."""
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
    return experts, weights


def generate(model: ConditionedModel, embeddings: np.ndarray | None, lengths: np.ndarray,
             seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [sample_request(model, None if embeddings is None else embeddings[i], int(n), rng)
            for i, n in enumerate(lengths)]


def _model(segments, weights, embeddings, neighbours, jump) -> ConditionedModel:
    return ConditionedModel(list(segments), list(weights), None if embeddings is None else _unit(embeddings),
                            neighbours, jump)


def fit_conditioned(segments: list[np.ndarray], weights: list[np.ndarray], embeddings: np.ndarray | None,
                    num_experts: int, seed: int = 0) -> ConditionedModel:
    """Keep the training requests; choose `neighbours` and `jump` by the smallest distance of
    routing generated for half of them (odd index, from the even ones) to that half's real routing."""
    from traces.stats import (  # stats measures; imported where used
        realism_distance,
        segment_figures,
    )

    kept = [i for i, s in enumerate(segments) if len(s)]
    segments, weights = [segments[i] for i in kept], [weights[i] for i in kept]
    embeddings = None if embeddings is None else np.asarray(embeddings)[kept]
    if len(segments) < 4:  # too few to split: every request is a neighbour of every prompt
        return _model(segments, weights, embeddings, len(segments), JUMPS[1])
    top_k = segments[0].shape[2]
    train, test = kept_half(len(segments), 0), kept_half(len(segments), 1)
    real = segment_figures([segments[i] for i in test], None if embeddings is None else embeddings[test],
                           num_experts, top_k)
    best = None
    for neighbours in NEIGHBOURS:
        for jump in JUMPS:
            half = _model([segments[i] for i in train], [weights[i] for i in train],
                          None if embeddings is None else embeddings[train], neighbours, jump)
            made = generate(half, None if embeddings is None else embeddings[test],
                            np.array([len(segments[i]) for i in test]), seed)
            ours = segment_figures([m[0] for m in made], None if embeddings is None else embeddings[test],
                                   num_experts, top_k)
            distance = realism_distance(ours, real)
            if best is None or distance < best[0]:
                best = (distance, neighbours, jump)
    return _model(segments, weights, embeddings, best[1], best[2])


def kept_half(n: int, parity: int) -> list[int]:
    return [i for i in range(n) if i % 2 == parity]
