"""Locality statistics of routing traces: how realistic is a trace's routing?

    python -m traces.stats TRACE [TRACE...] [--slots N ...] [--phase decode|all] [--out DIR] [--annotate]

prints the traces' figures side by side and writes per-layer CSVs and a figure into --out. TRACE is
a shipped trace's name ('default' too) or a trace directory.

Every figure is per layer, from the experts each iteration ran, over the iterations of one phase
in request order: 'decode' (default) is what the real Mixtral-8x7B sample records, so it is what
compares with it; 'all' adds every prompt token as an iteration, as FineMoE counts iterations.
- popularity: each expert's share of a layer's choices (skew: the top expert's share);
- request-level entropy: of a request's expert-count histogram (coarse, FineMoE's request-level
  map); iteration-level entropy: of one iteration's router probabilities (fine);
- token reuse: share of an iteration's experts also chosen by the previous iteration of the
  request, same layer (uniform random top-k of E gives k/E);
- popularity divergence: total-variation distance between two requests' expert popularity (how
  much requests, e.g. of different topics, differ);
- next-layer recall: share of layer l+1's experts predicted by the k experts that co-occurred most
  with layer l's choices, the co-occurrences counted on the other half of the requests (2-fold
  cross-fitting, so a small trace gains nothing from predicting itself), beside the recall of
  predicting by popularity alone;
- LRU and Belady hit rates against the number of slots: one cache per layer holding `slots`
  experts, persisting across requests, starting empty. These are the simulator's `lru` and
  `belady` with scope=per_layer and a budget of layers*slots experts, exactly, whenever no pass
  needs more than `slots` experts of a layer (decode-only traces with slots >= top-k); the
  simulator runs a prefill as one pass needing the union of its tokens' experts, which these
  token-level figures do not.

realism_figures() condenses these into the trace's meta.json `realism` (annotate() rewrites it;
TraceWriter fills it in for every trace it writes), with the distance to the real trace of the
same routing shape: the largest relative error of the token reuse and of the LRU and Belady hit
rates at a quarter, half and three quarters of the experts (2, 4 and 6 slots of Mixtral's 8).
"""
from __future__ import annotations

import argparse
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from traces.atomic import atomic_write_csv, atomic_write_text
from traces.cli import ArgumentParser, console as cli_console, run_cli
from traces.defaults import DATA_DIR, resolve_trace
from traces.errors import UserError
from traces.format import META, Trace, TraceMeta, load_trace, tally_experts
from traces.realism import (neighbour_similarity, next_layer_accuracy, probabilities_known, splittable,
                             trajectory_accuracy)

PHASES = ("decode", "all")
REALISM_SHARES = (0.25, 0.5, 0.75)  # slots as shares of a layer's experts: 2, 4, 6 of Mixtral's 8
_CHUNK_VALUES = 1 << 22  # router probabilities read at a time (16 MB of float32)


# --- the routing of a phase ---
def phase_rows(trace: Trace, phase: str = "decode") -> list[slice]:
    """Per request, the trace rows of its iterations of the phase ('decode' or 'all')."""
    if phase not in PHASES:
        raise UserError(f"phase '{phase}' unknown; use one of {', '.join(PHASES)}")
    rows = []
    for r in range(trace.num_requests):
        offset, prefill, decode = trace.rows(r)
        rows.append(slice(offset + prefill if phase == "decode" else offset, offset + prefill + decode))
    return rows


def routing_segments(trace: Trace, phase: str = "decode") -> list[np.ndarray]:
    """Per request, the experts its iterations of the phase ran: int64 [iterations, layers, top_k]."""
    return [np.asarray(trace.experts[rows], dtype=np.int64) for rows in phase_rows(trace, phase)]


def choice_mask(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """[iterations, layers, k] expert ids -> bool [iterations, layers, experts]."""
    mask = np.zeros(experts.shape[:-1] + (num_experts,), dtype=bool)
    np.put_along_axis(mask, experts, True, axis=-1)
    return mask


def entropy_bits(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Entropy in bits of distributions along `axis` (normalised there first; 0 log 0 = 0)."""
    p = np.asarray(p, dtype=np.float64)
    total = p.sum(axis=axis, keepdims=True)
    q = np.divide(p, total, out=np.zeros_like(p), where=total > 0)
    logs = np.log2(q, out=np.zeros_like(q), where=q > 0)
    return -(q * logs).sum(axis=axis)


# --- popularity and entropy ---
def expert_popularity(trace: Trace, phase: str = "decode") -> np.ndarray:
    """[layers, experts]: each expert's share of the layer's choices."""
    counts = sum((tally_experts(seg, trace.model.num_experts).astype(np.int64) for seg in routing_segments(trace, phase)),
                 np.zeros((trace.model.num_layers, trace.model.num_experts), dtype=np.int64))
    total = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, total, out=np.full(counts.shape, np.nan), where=total > 0)


def request_entropy(trace: Trace, phase: str = "decode") -> np.ndarray:
    """[layers]: entropy (bits) of a request's expert-count histogram, mean over requests."""
    per_request = [entropy_bits(tally_experts(seg, trace.model.num_experts)) for seg in routing_segments(trace, phase)
                   if len(seg)]
    return np.mean(per_request, axis=0) if per_request else np.full(trace.model.num_layers, np.nan)


def iteration_entropy(trace: Trace, phase: str = "decode") -> np.ndarray:
    """[layers]: entropy (bits) of one iteration's router probabilities, mean over iterations.

    Traces that keep only the top-k weights (the real Mixtral log) cap this at log2(k) bits.
    """
    total = np.zeros(trace.model.num_layers)
    count = 0
    step = max(1, _CHUNK_VALUES // (trace.model.num_layers * trace.model.num_experts))
    for rows in phase_rows(trace, phase):
        for start in range(rows.start, rows.stop, step):
            # Entropy of what was recorded: a topm trace's unknown tail counts as no mass (hence the cap).
            chunk = trace.probs(slice(start, min(start + step, rows.stop)), unknown=0.0)
            total += entropy_bits(chunk).sum(axis=0)
            count += len(chunk)
    return total / count if count else np.full(trace.model.num_layers, np.nan)


def popularity_divergence(segments: list[np.ndarray], num_experts: int, max_requests: int = 64) -> np.ndarray:
    """[layers]: total-variation distance between two requests' expert popularity, mean over pairs
    of the first `max_requests` requests (NaN with fewer than two): how much requests differ."""
    shares = []
    for seg in segments:
        if len(seg) and len(shares) < max_requests:
            counts = tally_experts(seg, num_experts).astype(np.float64)
            shares.append(counts / counts.sum(axis=1, keepdims=True))
    if len(shares) < 2:
        return np.full(segments[0].shape[1] if segments else 0, np.nan)
    shares = np.stack(shares)
    i, j = np.triu_indices(len(shares), k=1)
    return 0.5 * np.abs(shares[i] - shares[j]).sum(axis=-1).mean(axis=0)


# --- token-to-token reuse ---
def _reuse_counts(segments: list[np.ndarray], num_layers: int) -> tuple[np.ndarray, int]:
    """Per layer, experts shared with the previous iteration; and the experts compared per layer."""
    shared = np.zeros(num_layers, dtype=np.int64)
    compared = 0
    for seg in segments:
        if len(seg) < 2:
            continue
        prev, cur = seg[:-1], seg[1:]
        # |cur ∩ prev| per (iteration, layer): compare every pair of the two top-k sets.
        shared += (cur[..., :, None] == prev[..., None, :]).any(axis=-1).sum(axis=(0, 2))
        compared += cur.shape[0] * cur.shape[2]
    return shared, compared


def layer_reuse(trace: Trace, phase: str = "decode") -> np.ndarray:
    """[layers]: share of an iteration's experts also chosen by the previous iteration, same layer."""
    shared, compared = _reuse_counts(routing_segments(trace, phase), trace.model.num_layers)
    return shared / compared if compared else np.full(trace.model.num_layers, np.nan)


def token_reuse(trace: Trace, phase: str = "decode") -> float:
    """Share of a decode token's experts also chosen by the previous token at the same layer.

    Uniform random top-k of E gives k/E; real Mixtral-8x7B decode gives 34.4% on the shipped
    sample (37.5% over the four sequences of routing-realism.md).
    """
    shared, compared = _reuse_counts(routing_segments(trace, phase), trace.model.num_layers)
    return float(shared.sum() / (compared * trace.model.num_layers)) if compared else float("nan")


def trace_reuse(trace: Trace) -> float:
    """The trace's recorded reuse figure, or computed now when its metadata has none."""
    recorded = trace.meta.realism.get("token_reuse")
    return float(recorded) if recorded is not None else token_reuse(trace)


# --- layer-to-layer predictability ---
def _two_folds(segments: list[np.ndarray]) -> list[np.ndarray]:
    """Alternate requests into two folds; a single request is split into its halves."""
    nonempty = [seg for seg in segments if len(seg)]
    if len(nonempty) == 1:
        half = len(nonempty[0]) // 2
        nonempty = [nonempty[0][:half], nonempty[0][half:]]
    folds = [np.concatenate(nonempty[i::2]) for i in range(2) if nonempty[i::2]]
    return [fold for fold in folds if len(fold)]


def _top_k_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """The k highest scores of each row (ties to the lower index) as a mask."""
    top = np.argsort(-scores, axis=-1, kind="stable")[..., :k]
    return choice_mask(top, scores.shape[-1])


def next_layer_recall(trace: Trace, phase: str = "decode") -> tuple[np.ndarray, np.ndarray]:
    """[layers - 1] each: cross-fitted recall of layer l+1's experts from layer l's, and from popularity alone."""
    model = trace.model
    return _recall(routing_segments(trace, phase), model.num_layers, model.num_experts, model.top_k)


def _recall(segments: list[np.ndarray], layers: int, experts: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    folds = [choice_mask(fold, experts) for fold in _two_folds(segments)]
    if len(folds) < 2 or layers < 2:
        return np.full(layers - 1, np.nan), np.full(layers - 1, np.nan)
    hits = np.zeros(layers - 1)
    popular_hits = np.zeros(layers - 1)
    tested = 0
    for train, test in ((folds[0], folds[1]), (folds[1], folds[0])):
        tested += len(test) * k
        for layer in range(layers - 1):
            upper, lower = train[:, layer].astype(np.int64), train[:, layer + 1].astype(np.int64)
            popularity = lower.sum(axis=0)
            # Co-occurrence decides; popularity breaks its ties (scaled to stay below one co-occurrence).
            scores = test[:, layer].astype(np.int64) @ (upper.T @ lower) * (len(train) + 1) + popularity
            hits[layer] += (_top_k_mask(scores, k) & test[:, layer + 1]).sum()
            popular_hits[layer] += (_top_k_mask(popularity[None], k) & test[:, layer + 1]).sum()
    return hits / tested, popular_hits / tested


# --- per-layer caches ---
def _next_uses(experts: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """For each use (iteration, layer, j), the next iteration its expert is used at that layer
    (len(experts) if never); and for each (layer, expert) its first use."""
    n, layers, k = experts.shape
    t = np.broadcast_to(np.arange(n)[:, None, None], experts.shape).ravel()
    layer = np.broadcast_to(np.arange(layers)[None, :, None], experts.shape).ravel()
    block = layer * num_experts + experts.ravel()
    order = np.lexsort((t, block))
    following = np.full(t.size, n, dtype=np.int64)
    same = block[order][1:] == block[order][:-1]
    following[order[:-1][same]] = t[order][1:][same]
    first = np.full(layers * num_experts, n, dtype=np.int64)
    np.minimum.at(first, block, t)
    return following.reshape(experts.shape), first.reshape(layers, num_experts)


def _replay_per_layer_caches(experts: np.ndarray, num_experts: int, slots: Sequence[int], policy: str) -> np.ndarray:
    """Hits [len(slots), layers] of one cache of `slots` experts per layer, replaying `experts` in order.

    Follows the simulator step by step: a layer's needed experts are pinned; each miss evicts the
    unpinned resident expert used least recently (lru; the hits of a step count as used before its
    misses, which land in order) or next used furthest ahead (belady; never again is furthest, ties
    to the lower expert).
    """
    n, layers, k = experts.shape
    cap = np.asarray(slots, dtype=np.int64)[:, None]
    resident = np.zeros((len(slots), layers, num_experts), dtype=bool)
    hits = np.zeros((len(slots), layers), dtype=np.int64)
    rows = np.arange(layers)[:, None]
    excluded = np.iinfo(np.int64).max
    if policy == "lru":
        last_used = np.full((len(slots), layers, num_experts), -1, dtype=np.int64)
        position = np.arange(k)
    else:
        following, next_use = _next_uses(experts, num_experts)
    for t in range(n):
        x = experts[t]
        need = np.zeros((layers, num_experts), dtype=bool)
        need[rows, x] = True
        hit = resident[:, rows, x]  # [slots, layers, k]
        hits += hit.sum(axis=-1)
        evict = np.maximum(resident.sum(axis=-1) + (~hit).sum(axis=-1) - cap, 0)
        key = last_used if policy == "lru" else np.broadcast_to(-next_use, resident.shape)
        key = np.where(resident & ~need, key, excluded)
        order = np.argsort(key, axis=-1, kind="stable")
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(num_experts), axis=-1)
        resident &= ~(rank < evict[..., None])
        resident[:, rows, x] = True
        if policy == "lru":
            last_used[:, rows, x] = t * 2 * k + np.where(hit, position, k + position)
        else:
            next_use[rows, x] = following[t]
    return hits


def default_slots(num_experts: int, top_k: int) -> list[int]:
    """Every slot count from top-k to all experts (at most 16 values, evenly spread)."""
    return sorted({int(round(s)) for s in np.linspace(top_k, num_experts, min(16, num_experts - top_k + 1))})


def cache_hit_rates(trace: Trace, slots: Sequence[int] | None = None, phase: str = "decode") -> pd.DataFrame:
    """Per layer and slot count: hit rates of per-layer LRU and Belady caches (see the module doc)."""
    model = trace.model
    slots = default_slots(model.num_experts, model.top_k) if slots is None else sorted({int(s) for s in slots})
    bad = [s for s in slots if not model.top_k <= s <= model.num_experts]
    if bad:
        raise UserError(f"slots {bad} outside {model.top_k}..{model.num_experts}: a layer needs room for its "
                        f"top-{model.top_k} and has {model.num_experts} experts")
    segments = [seg for seg in routing_segments(trace, phase) if len(seg)]
    experts = np.concatenate(segments) if segments else np.zeros((0, model.num_layers, model.top_k), dtype=np.int64)
    uses = len(experts) * model.top_k
    frames = []
    results = {policy: _replay_per_layer_caches(experts, model.num_experts, slots, policy) for policy in ("lru", "belady")}
    for i, s in enumerate(slots):
        frames.append(pd.DataFrame({
            "layer": np.arange(model.num_layers), "slots": s, "expert_uses": uses,
            "lru_hit_rate": results["lru"][i] / uses if uses else np.nan,
            "belady_hit_rate": results["belady"][i] / uses if uses else np.nan,
        }))
    return pd.concat(frames, ignore_index=True)


# --- all figures of a trace ---
def layer_stats(trace: Trace, phase: str = "decode") -> pd.DataFrame:
    """One row per layer: popularity skew, entropies, reuse and next-layer predictability."""
    popularity = expert_popularity(trace, phase)
    recall, popular_recall = next_layer_recall(trace, phase)
    return pd.DataFrame({
        "layer": np.arange(trace.model.num_layers),
        "top_expert_share": popularity.max(axis=1),
        "popularity_entropy_bits": entropy_bits(np.nan_to_num(popularity)),
        "request_entropy_bits": request_entropy(trace, phase),
        "request_divergence": popularity_divergence(routing_segments(trace, phase), trace.model.num_experts),
        "iteration_entropy_bits": iteration_entropy(trace, phase),
        "token_reuse": layer_reuse(trace, phase),
        "next_layer_recall": np.append(recall, np.nan),
        "next_layer_recall_popularity": np.append(popular_recall, np.nan),
    })


def realism_slots(num_experts: int, top_k: int) -> list[int]:
    return sorted({max(top_k, int(round(share * num_experts))) for share in REALISM_SHARES})


def _mean(values: np.ndarray) -> float | None:
    values = np.asarray(values, dtype=np.float64)
    return None if np.isnan(values).all() else float(np.nanmean(values))


DISTANCES = (1, 3, 6)  # trajectory-search prefetch distances that enter the figures
FOLDS = 4  # real-vs-real spread: each fold of a real reference's requests against the rest


def routing_kind(meta: TraceMeta) -> str:
    """'real' (recorded routing, converted or collected), or what the provenance says it is."""
    kind = meta.source.details.get("routing")
    if kind is not None:
        return str(kind)
    return "real" if meta.source.tool.startswith(("traces.convert", "traces.collect")) else "synthetic"


def segment_figures(segments: list[np.ndarray], embeddings: np.ndarray | None, num_experts: int,
                    top_k: int) -> dict[str, Any]:
    """Every token-level figure of per-request routing [iterations, layers, k] (None where too few
    requests): what the distance to real routing compares."""
    kept = [i for i, seg in enumerate(segments) if len(seg)]
    segments = [segments[i] for i in kept]
    embeddings = None if embeddings is None else np.asarray(embeddings)[kept]
    layers = segments[0].shape[1]
    slots = realism_slots(num_experts, top_k)
    experts = np.concatenate(segments)
    uses = len(experts) * top_k
    caches = {policy: _replay_per_layer_caches(experts, num_experts, slots, policy) / uses for policy in ("lru", "belady")}
    shared, compared = _reuse_counts(segments, layers)
    counts = sum(tally_experts(seg, num_experts).astype(np.int64) for seg in segments)
    popularity = counts / counts.sum(axis=1, keepdims=True)
    recall = _mean(_recall(segments, layers, num_experts, top_k)[0])
    predictable = splittable(segments)  # the predictor figures need a training and a held-out part
    trajectory = trajectory_accuracy(segments, num_experts, DISTANCES) if predictable else {}
    neighbour = (neighbour_similarity(segments, embeddings, num_experts)
                 if embeddings is not None and len(segments) >= 3 else (None, None))
    return {
        "decode_iterations": int(len(experts)),
        "token_reuse": float(shared.sum() / (compared * layers)) if compared else None,
        "lru_hit_rate": {str(s): float(caches["lru"][i].mean()) for i, s in enumerate(slots)},
        "belady_hit_rate": {str(s): float(caches["belady"][i].mean()) for i, s in enumerate(slots)},
        "top_expert_share": float(popularity.max(axis=1).mean()),
        "request_entropy_bits": float(np.mean([entropy_bits(tally_experts(seg, num_experts)) for seg in segments])),
        "request_divergence": _mean(popularity_divergence(segments, num_experts)),
        "next_layer_recall": recall,
        "next_layer_accuracy": next_layer_accuracy(segments, num_experts) if predictable else None,
        "trajectory_accuracy": {str(d): trajectory.get(d) for d in DISTANCES},  # None: too few layers
        "neighbour_cosine": neighbour[0],
        "random_pair_cosine": neighbour[1],
    }


def _embeddings(trace: Trace) -> np.ndarray | None:
    return trace.embedding() if trace.meta.default_embedding is not None else None


def _own_figures(trace: Trace) -> dict[str, Any]:
    model = trace.model
    figures = segment_figures(routing_segments(trace), _embeddings(trace), model.num_experts, model.top_k)
    return {"phase": "decode", "routing": routing_kind(trace.meta), "probabilities": probabilities_known(trace),
            **figures, "iteration_entropy_bits": _mean(iteration_entropy(trace))}


def real_traces(model_name: str) -> list[str]:
    """The shipped traces whose meta says their routing is real, of this model."""
    names = []
    for meta_path in sorted(DATA_DIR.glob("*/meta.json")):
        meta = TraceMeta.from_json(meta_path.read_text(), str(meta_path))
        if meta.model.name == model_name and routing_kind(meta) == "real":
            names.append(meta_path.parent.name)
    return names


def fold_spread(segments: list[np.ndarray], embeddings: np.ndarray | None, num_experts: int, top_k: int) -> float | None:
    """Real-vs-real spread: the largest distance of one of FOLDS folds of the requests (every
    FOLDS-th; a lone request's halves) to the other requests. A trace within it of real routing is as
    close as real routing is to itself."""
    kept = [i for i, seg in enumerate(segments) if len(seg)]
    if len(kept) == 1:
        half = len(segments[kept[0]]) // 2
        segments, embeddings, kept = [segments[kept[0]][:half], segments[kept[0]][half:]], None, [0, 1]
    folds = min(FOLDS, len(kept))
    if folds < 2:
        return None

    def figures(index: list[int]) -> dict[str, Any]:
        return segment_figures([segments[i] for i in index], None if embeddings is None else embeddings[index],
                               num_experts, top_k)

    return max(realism_distance(figures([i for n, i in enumerate(kept) if n % folds == f]),
                                figures([i for n, i in enumerate(kept) if n % folds != f])) or 0.0
               for f in range(folds))


def real_reference(model_name: str, fresh: dict[str, dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """All real routing of a model (every shipped real trace): its figures, how many real tokens stand
    behind them and the real-vs-real spread (fold_spread). One trace's come from its meta.json (or
    `fresh`, figures just computed); several traces' requests are pooled and measured together."""
    names = real_traces(model_name)
    fresh = fresh or {}
    if not names:
        return None
    if len(names) == 1:
        name = names[0]
        figures = fresh.get(name) or TraceMeta.from_json((DATA_DIR / name / META).read_text(), name).realism
        if "real_spread_own" not in figures:
            figures = _own_figures(load_trace(DATA_DIR / name)) | {"real_spread_own": _trace_spread(load_trace(DATA_DIR / name))}
        return {"traces": names, "tokens": figures["decode_iterations"], "figures": figures,
                "spread": figures["real_spread_own"]}
    traces = [load_trace(DATA_DIR / name) for name in names]
    segments = [seg for trace in traces for seg in routing_segments(trace)]
    embeddings = [_embeddings(trace) for trace in traces]
    pooled = None if any(e is None for e in embeddings) else np.concatenate(embeddings)
    model = traces[0].model
    figures = segment_figures(segments, pooled, model.num_experts, model.top_k)
    return {"traces": names, "tokens": figures["decode_iterations"], "figures": figures,
            "spread": fold_spread(segments, pooled, model.num_experts, model.top_k)}


def _trace_spread(trace: Trace) -> float | None:
    return fold_spread(routing_segments(trace), _embeddings(trace), trace.model.num_experts, trace.model.top_k)


def realism_figures(trace: Trace) -> dict[str, Any]:
    """The figures meta.json carries (decode phase): every figure of segment_figures, iteration
    entropy, whether probabilities are full, and the distance to all real routing of the same model
    (real_reference; None where there is none) with the real tokens behind it and the real-vs-real
    spread. A real trace also carries its own fold spread (real_spread_own)."""
    figures = _own_figures(trace)
    fresh = {}
    if figures["routing"] == "real":
        figures["real_spread_own"] = _trace_spread(trace)
        fresh[trace.path.name] = figures
    reference = real_reference(trace.model.name, fresh)
    figures["reference"] = reference["traces"] if reference is not None else None
    figures["reference_tokens"] = reference["tokens"] if reference is not None else None
    figures["real_spread"] = reference["spread"] if reference is not None else None
    figures["distance_to_real"] = (realism_distance(figures, reference["figures"]) if reference is not None
                                   else None)
    return figures


def _pairs(figures: dict[str, Any], reference: dict[str, Any]) -> list[tuple[str, float, float]]:
    """(name, ours, real) of every figure both have (nested per-slot and per-distance ones flattened)."""
    pairs = []
    for key in DISTANCE_FIGURES:
        ours, theirs = figures.get(key), reference.get(key)
        if isinstance(theirs, dict):
            pairs += [(f"{key}[{s}]", ours.get(s), v) for s, v in theirs.items() if isinstance(ours, dict)]
        else:
            pairs.append((key, ours, theirs))
    return [(name, a, b) for name, a, b in pairs if a is not None and b]


# Every token-level figure; iteration entropy stays out (it measures what was recorded: top-k only or all).
DISTANCE_FIGURES = ("token_reuse", "lru_hit_rate", "belady_hit_rate", "top_expert_share", "request_entropy_bits",
                    "request_divergence", "next_layer_recall", "next_layer_accuracy", "trajectory_accuracy",
                    "neighbour_cosine", "random_pair_cosine")


# What `python -m traces.stats` prints of a trace's realism figures (recomputed where meta.json lacks one).
PRINTED_REALISM = DISTANCE_FIGURES + ("probabilities", "routing", "reference", "reference_tokens", "real_spread",
                                      "distance_to_real")


def relative_errors(figures: dict[str, Any], reference: dict[str, Any]) -> dict[str, float]:
    """Relative error of every figure both have, against the reference."""
    return {name: (a - b) / b for name, a, b in _pairs(figures, reference)}


def realism_distance(figures: dict[str, Any], reference: dict[str, Any]) -> float | None:
    """Largest relative error of every figure both have (DISTANCE_FIGURES) against the reference."""
    errors = relative_errors(figures, reference)
    return max(abs(e) for e in errors.values()) if errors else None


def annotate(path: str | Path) -> dict[str, Any]:
    """Compute a trace's realism figures and rewrite its meta.json with them (temporary file, then rename)."""
    trace = load_trace(path)
    figures = realism_figures(trace)
    atomic_write_text(trace.path / META, replace(trace.meta, realism=figures).to_json())
    return figures


# --- command line ---
def summary_rows(trace: Trace, per_layer: pd.DataFrame, rates: pd.DataFrame, phase: str) -> dict[str, Any]:
    """A trace's headline figures (means over layers), one entry per printed row."""
    row: dict[str, Any] = {
        "requests": trace.num_requests,
        f"{phase} iterations": int(sum(len(seg) for seg in routing_segments(trace, phase))),
        "token reuse": _mean(per_layer["token_reuse"]),
    }
    means = rates.groupby("slots")[["lru_hit_rate", "belady_hit_rate"]].mean()
    for s in means.index:
        row[f"LRU hit rate, {s} slots"] = float(means.loc[s, "lru_hit_rate"])
    for s in means.index:
        row[f"Belady hit rate, {s} slots"] = float(means.loc[s, "belady_hit_rate"])
    row["request-level entropy (bits)"] = _mean(per_layer["request_entropy_bits"])
    row["iteration-level entropy (bits)"] = _mean(per_layer["iteration_entropy_bits"])
    row["popularity divergence between requests"] = _mean(per_layer["request_divergence"])
    row["top expert share"] = _mean(per_layer["top_expert_share"])
    row["next-layer recall (popularity only)"] = (_mean(per_layer["next_layer_recall"]),
                                                  _mean(per_layer["next_layer_recall_popularity"]))
    realism = trace.meta.realism
    if not realism or any(key not in realism for key in PRINTED_REALISM):  # written before the full set
        realism = realism_figures(trace)
    row["next-layer predictor accuracy"] = realism["next_layer_accuracy"]
    for d in DISTANCES:
        row[f"trajectory search accuracy, distance {d}"] = realism["trajectory_accuracy"].get(str(d))
    row["routing cosine: prompt neighbours (random pairs)"] = (realism["neighbour_cosine"], realism["random_pair_cosine"])
    row["router probabilities"] = realism["probabilities"]
    row["routing"] = realism["routing"]
    row["distance to real routing"] = realism["distance_to_real"]
    reference = realism["reference"]
    row["... measured against (real tokens)"] = (f"{', '.join(reference)} ({realism['reference_tokens']:,})"
                                                 if reference else None)
    row["... real against real (fold spread)"] = realism["real_spread"]
    return row


def _format(key: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    if isinstance(value, tuple):
        return f"{_format(key, value[0])} ({_format(key, value[1])})"
    if isinstance(value, float):
        return f"{value:.3f}" if "bits" in key else f"{value:.1%}"
    return str(value)


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments (the README's command lines are checked against it)."""
    parser = ArgumentParser(prog="python -m traces.stats", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("traces", nargs="+", help="shipped trace names ('default' too) or trace directories")
    parser.add_argument("--slots", type=int, nargs="+", help="cache slots per layer (default: top-k .. experts)")
    parser.add_argument("--phase", choices=PHASES, default="decode")
    parser.add_argument("--out", type=Path, default=Path("trace_stats"), help="folder for the CSVs and the figure")
    parser.add_argument("--annotate", action="store_true", help="also rewrite each trace's realism figures in meta.json")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)

    def work() -> None:
        from rich.markup import escape
        from rich.table import Table

        from traces.stats_plot import plot_stats

        console = cli_console()
        traces = [load_trace(resolve_trace(name)) for name in args.traces]
        if args.annotate:
            for trace in traces:
                annotate(trace.path)
            traces = [load_trace(trace.path) for trace in traces]
        labels = _labels(traces)
        per_layer, rates, summaries = [], [], {}
        for label, trace in zip(labels, traces):
            layers = layer_stats(trace, args.phase).assign(trace=label)
            hit = cache_hit_rates(trace, args.slots, args.phase).assign(trace=label)
            per_layer.append(layers)
            rates.append(hit)
            summaries[label] = summary_rows(trace, layers, hit, args.phase)
            console.print(f"[bold]{escape(label)}[/]: {escape(str(trace.path))} — routing from "
                          f"{escape(trace.source.label())}")
        table = Table(title=f"routing statistics ({args.phase} iterations; means over layers)")
        table.add_column("figure")
        for label in labels:
            table.add_column(label, justify="right")
        for key in _row_order(summaries.values()):
            table.add_row(key, *(_format(key, summaries[label].get(key)) for label in labels))
        console.print(table)
        args.out.mkdir(parents=True, exist_ok=True)
        layers_frame, rates_frame = pd.concat(per_layer, ignore_index=True), pd.concat(rates, ignore_index=True)
        atomic_write_csv(args.out / "per_layer.csv", layers_frame)
        atomic_write_csv(args.out / "hit_rates.csv", rates_frame)
        plot_stats(layers_frame, rates_frame, args.out / "stats.png")
        console.print(f"per-layer figures and plot: {args.out}/ (per_layer.csv, hit_rates.csv, stats.png)")

    run_cli(work)


def _row_order(summaries) -> list[str]:
    """Every trace's rows once: the cache rows of traces of different shapes merged by slot count."""
    keys = list(dict.fromkeys(k for summary in summaries for k in summary))

    def group(key: str) -> tuple[int, int]:
        match = re.fullmatch(r"(LRU|Belady) hit rate, (\d+) slots", key)
        if match is None:
            return (0, 0) if keys.index(key) < keys.index("token reuse") + 1 else (3, 0)
        return (1 if match.group(1) == "LRU" else 2, int(match.group(2)))

    return sorted(keys, key=group)


def _labels(traces: list[Trace]) -> list[str]:
    names = [trace.path.name for trace in traces]
    return [name if names.count(name) == 1 else f"{name} ({i})" for i, name in enumerate(names)]


if __name__ == "__main__":
    main()
