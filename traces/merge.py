"""Merge trace directories of one model into one trace, written atomically (e.g. a collection's shards)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from traces.errors import UserError
from traces.format import Provenance, Trace, TraceWriter, load_trace


def merge_traces(paths: Sequence[str | Path], out_dir: str | Path, *, source: Provenance | None = None,
                 order: Sequence[str] | None = None, realism: dict[str, Any] | None = None,
                 extra: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Concatenate the requests of several traces, in the given order of request ids (default: as listed).

    All parts must have the same model and probability layout; the source defaults to the parts'
    common provenance. Nothing is written unless every part is valid and consistent.
    """
    if not paths:
        raise UserError(f"{out_dir}: no traces to merge")
    parts = [load_trace(p) for p in paths]
    first = parts[0]
    for part in parts[1:]:
        if part.model != first.model:
            raise UserError(f"{part.path}: model {part.model.name} differs from {first.path}'s {first.model.name}; "
                            "merge only traces of one model")
        if (part.meta.probs_layout, part.meta.topm) != (first.meta.probs_layout, first.meta.topm):
            raise UserError(f"{part.path}: probability layout differs from {first.path}'s; merge traces of one layout")
        if source is None and part.source != first.source:
            raise UserError(f"{part.path}: provenance differs from {first.path}'s; pass the merged trace's source")
    entries = [(part, r) for part in parts for r in range(part.num_requests)]
    ids = [str(part.requests["request_id"].iloc[r]) for part, r in entries]
    if len(set(ids)) != len(ids):
        raise UserError(f"{out_dir}: request ids repeat across the merged traces; merge traces of distinct requests")
    if order is not None:
        by_id = dict(zip(ids, entries))
        if sorted(order) != sorted(ids):
            raise UserError(f"{out_dir}: the requested order names {len(order)} requests, the traces hold {len(ids)} "
                            "different ones")
        entries = [by_id[rid] for rid in order]

    writer = TraceWriter(out_dir, first.model, source or first.source, topm=first.meta.topm or None,
                         default_embedding=first.meta.default_embedding, overwrite=overwrite)
    for part, r in entries:
        _copy_request(writer, part, r)
    return writer.close(realism=realism, extra=extra if extra is not None else first.meta.extra)


def _copy_request(writer: TraceWriter, part: Trace, r: int) -> None:
    offset, prefill, decode = part.rows(r)
    rows = slice(offset, offset + prefill + decode)
    embeddings = {name: part.embedding(name)[r] for name in part.embedding_names}
    writer.add_request(
        **part.request_fields(r), probs=part.probs(rows), prefill_iters=prefill,
        experts=part.experts[rows], prefill_counts=part.prefill_counts[r],
        embeddings={name: vector for name, vector in embeddings.items() if not np.isnan(vector).all()},
        lookahead=None if part.lookahead is None else part.lookahead[rows],
        hidden_proj=None if part.hidden_proj is None else part.hidden_proj[rows],
    )
