"""How requests of a trace become forward passes: one source of truth for every engine.

A request runs a prefill pass when the trace records its prompt's routing (per-token prefill
iterations, or only per-expert prompt-token counts), then one decode pass per recorded decode
iteration. With continuous batching, the decode passes of the running requests are merged into one
pass that needs, at each layer, the union of their experts. The simulator, realrun and the
oracles' view of the future all walk these passes.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from traces import Trace


@dataclass(slots=True)
class Pass:
    kind: str  # "prefill" | "decode"
    requests: tuple[int, ...]  # trace indices of the requests in the pass
    tokens: int  # tokens the non-expert layers process
    probs: np.ndarray  # [rows, layers, experts]: router probabilities of the pass's iterations
    token_request: np.ndarray  # for each row of probs, its request's position in `requests`
    experts: list[tuple[int, ...]]  # per layer, the experts the pass needs
    expert_tokens: list[list[int]] | None  # per layer, tokens each needed expert serves; None: one each
    rows: np.ndarray | None  # the trace rows of the pass (None for a prefill known only by counts)


def request_passes(trace: Trace, r: int) -> Iterator[Pass]:
    offset, prefill, decode = trace.rows(r)
    probs = trace.probs(slice(offset, offset + prefill + decode))  # [iterations, layers, experts]
    counts = trace.prefill_counts[r]
    if prefill or counts.any():
        if prefill:
            prefill_probs, rows = probs[:prefill], np.arange(offset, offset + prefill)
        else:
            prefill_probs, rows = (counts / counts.sum(axis=1, keepdims=True))[None].astype(np.float32), None
        needed = [np.flatnonzero(counts[layer]) for layer in range(trace.model.num_layers)]
        prompt_tokens = int(trace.requests["prompt_tokens"].iat[r])
        yield Pass("prefill", (r,), max(prompt_tokens, prefill, 1), prefill_probs,
                   np.zeros(len(prefill_probs), dtype=np.intp),
                   [tuple(int(e) for e in n) for n in needed],
                   [[int(counts[layer, e]) for e in n] for layer, n in enumerate(needed)], rows)
    experts = trace.experts[offset + prefill: offset + prefill + decode].tolist()
    single = np.zeros(1, dtype=np.intp)
    for i in range(decode):
        row = offset + prefill + i
        yield Pass("decode", (r,), 1, probs[prefill + i: prefill + i + 1], single, [tuple(e) for e in experts[i]],
                   None, np.array([row]))


def merge_decode(passes: list[Pass]) -> Pass:
    """One decode pass for a batch: rows stacked, experts the union, tokens per expert counted."""
    if len(passes) == 1:
        return passes[0]
    layers = len(passes[0].experts)
    experts, expert_tokens = [], []
    for layer in range(layers):
        counts = Counter(e for p in passes for e in p.experts[layer])
        chosen = tuple(sorted(counts))
        experts.append(chosen)
        expert_tokens.append([counts[e] for e in chosen])
    return Pass("decode", tuple(r for p in passes for r in p.requests), len(passes),
                np.concatenate([p.probs for p in passes]), np.arange(len(passes), dtype=np.intp),
                experts, expert_tokens, np.concatenate([p.rows for p in passes]))
