"""Traces cut down for the executor: to its first layers, so a model too large for the host's memory
still runs; to a short head, so the host time of every policy can be measured on the executor in
seconds.

The simulator and the executor are both given the cut trace (and the model profile with that many
layers), so they compare like with like; every result says how many layers ran.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from traces import Provenance, Trace, TraceWriter, load_trace
from traces.errors import UserError


def first_layers(trace: Trace, num_layers: int, out_dir: Path) -> Trace:
    """The same requests and routing, restricted to layers 0..num_layers-1 (written to out_dir)."""
    model = trace.model
    if not 1 <= num_layers <= model.num_layers:
        raise UserError(f"layers={num_layers}: the trace's model has {model.num_layers} layers; give 1..{model.num_layers}")
    if num_layers == model.num_layers:
        return trace
    return _cut(trace, out_dir, f"first {num_layers} of {model.num_layers} layers", num_layers,
                list(range(trace.num_requests)))


def head(trace: Trace, requests: list[int], decode_tokens: int, out_dir: Path) -> Trace:
    """The given requests in order, whole but the last, cut to its first `decode_tokens` decode
    iterations (a last one that repeats an earlier request is the copy of it: renamed)."""
    if not requests or not all(0 <= r < trace.num_requests for r in requests) or decode_tokens < 1:
        raise UserError(f"head: requests {requests} of {trace.num_requests}, {decode_tokens} decode tokens: "
                        "give requests of the trace and at least one token")
    return _cut(trace, out_dir, f"requests {requests}, the last cut to {decode_tokens} decode tokens",
                trace.model.num_layers, requests, decode_tokens)


def held_out_head(trace: Trace, train_fraction: float, decode_tokens: int, out_dir: Path) -> tuple[Trace, float, int]:
    """(a short trace, its train_fraction, the request of `trace` it replays): the request just before
    those replayed at `train_fraction`, cut to `decode_tokens`, trained on the requests before it:
    never a measured one. With none before it (a trace of two), the first, trained on itself whole."""
    last = max(0, int(trace.num_requests * train_fraction) - 1)
    requests = list(range(last)) + [last] if last else [0, 0]
    fraction = (len(requests) - 0.5) / len(requests)  # all but the last train
    return head(trace, requests, decode_tokens, out_dir), fraction, last


def _cut(trace: Trace, out_dir: Path, what: str, num_layers: int, requests: list[int],
         last_tokens: int | None = None) -> Trace:
    model, source = trace.model, trace.source
    notes = f"{source.notes}; " if source.notes else ""
    provenance = Provenance(source.model, source.weights_origin, source.dataset, source.tool,
                            f"{notes}{what} (realrun.subset)", source.details)
    cut = slice(0, num_layers)
    writer = TraceWriter(out_dir, dataclasses.replace(model, num_layers=num_layers), provenance,
                         topm=trace.meta.topm or None, default_embedding=trace.meta.default_embedding, overwrite=True)
    embeddings = {name: trace.embedding(name) for name in trace.embedding_names}
    for i, r in enumerate(requests):
        offset, prefill, decode = trace.rows(r)
        fields = trace.request_fields(r)
        if last_tokens is not None and i == len(requests) - 1:
            decode = min(decode, last_tokens)
            fields["output_tokens"] = min(fields["output_tokens"], decode)
            if r in requests[:-1]:
                fields["request_id"] += "/head"
        rows = slice(offset, offset + prefill + decode)
        writer.add_request(
            **fields,
            probs=trace.probs(rows)[:, cut], experts=np.asarray(trace.experts[rows, cut]), prefill_iters=prefill,
            prefill_counts=np.asarray(trace.prefill_counts[r, cut]),
            embeddings={name: e[r] for name, e in embeddings.items() if not np.isnan(e[r]).any()} or None,
            lookahead=None if trace.lookahead is None else np.asarray(trace.lookahead[rows, cut]),
            hidden_proj=None if trace.hidden_proj is None else np.asarray(trace.hidden_proj[rows, cut]))
    extra = {**trace.meta.extra, "layers_of": model.num_layers} if num_layers < model.num_layers else trace.meta.extra
    writer.close(extra=extra)  # realism recomputed for the cut
    return load_trace(out_dir)
