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
    """One forward pass as the engines replay it (the trace rows, probabilities, experts per layer);
    a policy sees the same pass as a policies.base.Step, which carries its index in the run and
    only what a policy may read."""

    kind: str  # "prefill" | "decode"
    requests: tuple[int, ...]  # trace indices of the requests in the pass
    tokens: int  # tokens the non-expert layers process
    probs: np.ndarray  # [rows, layers, experts]: router probabilities of the pass's iterations
    token_request: np.ndarray  # for each row of probs, its request's position in `requests`
    experts: list[tuple[int, ...]]  # per layer, the experts the pass needs
    expert_tokens: list[list[int]] | None  # per layer, tokens each needed expert serves; None: one each
    rows: np.ndarray | None  # the trace rows of the pass (None for a prefill known only by counts)


@dataclass(frozen=True)
class StepTable:
    """The forward passes of requests run one after another (max_batch 1), as arrays: step i is
    request `request[i]`'s prefill (row -1) or the decode iteration of trace row `row[i]`."""

    request: np.ndarray  # int64 [steps]
    row: np.ndarray  # int64 [steps]; -1: a prefill


def has_prefill(trace: Trace) -> np.ndarray:
    """Per request: whether it runs a prefill pass (request_passes' rule)."""
    counts = np.asarray(trace.prefill_counts).reshape(trace.num_requests, -1)
    return (trace.prefill_iters > 0) | counts.any(axis=1)


def step_table(trace: Trace, requests: list[int]) -> StepTable:
    """request_passes of each request in turn, as arrays (no loop per token)."""
    reqs = np.asarray(requests, dtype=np.int64)
    prefilled = has_prefill(trace)[reqs].astype(np.int64)
    decode = trace.decode_iters[reqs]
    steps = prefilled + decode
    owner = np.repeat(np.arange(len(reqs)), steps)
    within = np.arange(int(steps.sum())) - np.repeat(np.cumsum(steps) - steps, steps) - prefilled[owner]
    first = trace.iter_offset[reqs] + trace.prefill_iters[reqs]
    row = np.where(within < 0, -1, first[owner] + within)
    return StepTable(reqs[owner], row.astype(np.int64))


def replay_uses(trace: Trace, requests: list[int]) -> tuple[StepTable, np.ndarray, np.ndarray]:
    """Every expert use of those steps: (steps, block, position), block = layer * num_experts + expert
    and position = step * num_layers + layer, sorted by block then position."""
    L, E = trace.model.num_layers, trace.model.num_experts
    steps = step_table(trace, requests)
    layer = np.arange(L, dtype=np.int64)
    decode = np.flatnonzero(steps.row >= 0)
    experts = np.asarray(trace.experts[steps.row[decode]], dtype=np.int64)  # [decode steps, layers, k]
    dblock = (layer[None, :, None] * E + experts).ravel()
    dpos = np.broadcast_to((decode[:, None] * L + layer[None, :])[:, :, None], experts.shape).ravel()
    prefill = np.flatnonzero(steps.row < 0)
    which, pl, pe = np.nonzero(np.asarray(trace.prefill_counts)[steps.request[prefill]])
    block = np.concatenate([dblock, pl * E + pe]).astype(np.int64)
    pos = np.concatenate([dpos, prefill[which] * L + pl]).astype(np.int64)
    order = np.lexsort((pos, block))
    return steps, block[order], pos[order]


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
