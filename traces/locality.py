"""Cheap locality figures of a trace, used wherever a result is shown beside its routing."""
from __future__ import annotations

import numpy as np

from traces.format import Trace


def token_reuse(trace: Trace) -> float:
    """Share of a decode token's experts also chosen by the previous token at the same layer.

    Uniform random top-k of E gives k/E; real Mixtral-8x7B decode gives 37.5% (routing-realism.md).
    """
    shared = 0
    total = 0
    k = trace.model.top_k
    for r in range(trace.num_requests):
        offset, prefill, decode = trace.rows(r)
        if decode < 2:
            continue
        experts = np.sort(np.asarray(trace.experts[offset + prefill: offset + prefill + decode], dtype=np.int64), axis=-1)
        prev, cur = experts[:-1], experts[1:]
        # |cur ∩ prev| per (token, layer): compare every pair of the two top-k sets.
        shared += int((cur[..., :, None] == prev[..., None, :]).any(axis=-1).sum())
        total += cur.shape[0] * cur.shape[1] * k
    return shared / total if total else float("nan")


def trace_reuse(trace: Trace) -> float:
    """The trace's recorded reuse figure, or computed now when its metadata has none."""
    recorded = trace.meta.realism.get("token_reuse")
    return float(recorded) if recorded is not None else token_reuse(trace)
