"""How a request of a trace becomes forward passes: one source of truth for every engine.

A request runs a prefill pass when the trace records its prompt's routing (per-token prefill
iterations, or only per-expert prompt-token counts), then one decode pass per recorded decode
iteration. The simulator, realrun and the oracles' view of the future all walk these passes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from traces import Trace


@dataclass(slots=True)
class Pass:
    kind: str  # "prefill" | "decode"
    request: int
    tokens: int  # tokens the non-expert layers process
    probs: np.ndarray  # [rows, layers, experts]: router probabilities of the pass's iterations
    experts: list[tuple[int, ...]]  # per layer, the experts the pass needs
    expert_tokens: list[list[int]] | None  # per layer, tokens each needed expert serves; None: one each
    rows: slice | None  # the trace rows of the pass (None for a prefill known only by counts)


def request_passes(trace: Trace, r: int) -> Iterator[Pass]:
    offset, prefill, decode = trace.rows(r)
    probs = trace.probs(slice(offset, offset + prefill + decode))  # [iterations, layers, experts]
    counts = trace.prefill_counts[r]
    if prefill or counts.any():
        if prefill:
            prefill_probs, rows = probs[:prefill], slice(offset, offset + prefill)
        else:
            prefill_probs, rows = (counts / counts.sum(axis=1, keepdims=True))[None].astype(np.float32), None
        needed = [np.flatnonzero(counts[layer]) for layer in range(trace.model.num_layers)]
        prompt_tokens = int(trace.requests["prompt_tokens"].iat[r])
        yield Pass("prefill", r, max(prompt_tokens, prefill, 1), prefill_probs,
                   [tuple(int(e) for e in n) for n in needed],
                   [[int(counts[layer, e]) for e in n] for layer, n in enumerate(needed)], rows)
    experts = trace.experts[offset + prefill: offset + prefill + decode].tolist()
    for i in range(decode):
        row = offset + prefill + i
        yield Pass("decode", r, 1, probs[prefill + i: prefill + i + 1], [tuple(e) for e in experts[i]], None,
                   slice(row, row + 1))
