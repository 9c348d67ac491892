"""A trace cut down to its first layers, so a model too large for the host's memory still runs.

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
    source = trace.source
    notes = f"{source.notes}; " if source.notes else ""
    provenance = Provenance(source.model, source.weights_origin, source.dataset, source.tool,
                            f"{notes}first {num_layers} of {model.num_layers} layers (realrun.subset)", source.details)
    cut = slice(0, num_layers)
    writer = TraceWriter(out_dir, dataclasses.replace(model, num_layers=num_layers), provenance,
                         topm=trace.meta.topm or None, default_embedding=trace.meta.default_embedding, overwrite=True)
    embeddings = {name: trace.embedding(name) for name in trace.embedding_names}
    for r in range(trace.num_requests):
        offset, prefill, decode = trace.rows(r)
        rows = slice(offset, offset + prefill + decode)
        writer.add_request(
            **trace.request_fields(r),
            probs=trace.probs(rows)[:, cut], experts=np.asarray(trace.experts[rows, cut]), prefill_iters=prefill,
            prefill_counts=np.asarray(trace.prefill_counts[r, cut]),
            embeddings={name: e[r] for name, e in embeddings.items() if not np.isnan(e[r]).any()} or None,
            lookahead=None if trace.lookahead is None else np.asarray(trace.lookahead[rows, cut]),
            hidden_proj=None if trace.hidden_proj is None else np.asarray(trace.hidden_proj[rows, cut]))
    writer.close(extra={**trace.meta.extra, "layers_of": model.num_layers})  # realism recomputed for the cut
    return load_trace(out_dir)
