"""Realistic routing at any scale: fit a generative routing model to a real trace, then write a trace
of any number of requests with the lengths and prompt embeddings of a real workload.

    python -m traces.synth --fit TRACE_DIR OUT_DIR --requests N --lengths sharegpt|lmsys|FILE
        [--max-prompt-tokens N] [--max-output-tokens N] [--prefill rows|counts] [--seed 0]

The routing model (traces.routing_model) learns per layer the experts' popularity, token-to-token
stickiness, drift within a request, and the transition from layer l-1's choice to layer l's, by
maximum likelihood on every iteration of TRACE_DIR; and the spread of per-request offsets that makes
its requests differ from one another as much as the recorded ones. Requests are drawn from the
workload (real prompt and output token counts; `lmsys`/`sharegpt` also carry real prompt
embeddings); each request's offset is shared in part (--topic-share) with the requests whose
prompt embeddings fall in the same k-means cluster (--topics), so prompts of a topic route alike.
Every prompt token is generated as a prefill iteration ('rows', default) or tallied into the
prefill's per-expert counts ('counts': a smaller trace; the simulator runs a prefill as one pass
either way). The provenance says what is real (lengths, embeddings) and what is synthetic
(all routing), and the meta carries the realism figures and the distance to real routing.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from traces.cli import ArgumentParser, run_cli
from traces.conditioned import ConditionedModel, fit_conditioned, generate, training_parts
from traces.errors import UserError
from traces.format import Provenance, Trace, TraceWriter, load_trace, tally_experts
from traces.routing_model import (RoutingModel, fit_request_spread, fit_routing_model, request_offsets,
                                  sample_routing)
from traces.stats import routing_segments
from traces.synthetic import decode_iterations
from traces.workloads import EMBEDDING_NAME, Workload, load_workload

PREFILL_MODES = ("rows", "counts")
ROUTINGS = ("model", "conditioned")
BATCH_REQUESTS = 64


@dataclass(frozen=True)
class SynthOptions:
    requests: int
    lengths: str = "sharegpt"  # a shipped workload or a file (traces.workloads)
    max_prompt_tokens: int | None = None
    max_output_tokens: int | None = None
    prefill: str = "rows"
    topics: int = 16
    topic_share: float = 0.5  # share of a request's offset variance common to its topic
    request_spread: float | None = None  # None: fitted to the source trace
    routing: str = "model"  # model: traces.routing_model; conditioned: traces.conditioned (decode only)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.requests < 1:
            raise UserError(f"--requests {self.requests}: need at least one request")
        if self.routing not in ROUTINGS:
            raise UserError(f"--routing {self.routing}: use {' or '.join(ROUTINGS)}")
        if self.prefill not in PREFILL_MODES:
            raise UserError(f"--prefill {self.prefill}: use {' or '.join(PREFILL_MODES)}")
        if self.topics < 1 or not 0 <= self.topic_share <= 1:
            raise UserError("--topics must be >= 1 and --topic-share within 0..1")
        for name in ("max_prompt_tokens", "max_output_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')} {value}: must be at least 1")
        if self.request_spread is not None and self.request_spread < 0:
            raise UserError(f"--request-spread {self.request_spread}: must be >= 0")


@dataclass
class FittedSource:
    trace: Trace
    model: RoutingModel
    request_spread: float


def _top_k_weights(trace: Trace, r: int) -> np.ndarray:
    offset, prefill, decode = trace.rows(r)
    rows = slice(offset, offset + prefill + decode)
    return np.take_along_axis(trace.probs(rows), np.asarray(trace.experts[rows], dtype=np.int64), axis=-1)


def fit_source(trace: Trace, seed: int = 0, requests: list[int] | None = None,
               request_spread: float | None = None) -> FittedSource:
    """Fit the routing model to every iteration of the given requests of a trace (all by default);
    the request spread too unless given."""
    chosen = list(range(trace.num_requests)) if requests is None else requests
    every = routing_segments(trace, "all")
    segments = [every[r] for r in chosen]
    if not any(len(seg) for seg in segments):
        raise UserError(f"{trace.path}: no iterations to fit a routing model to")
    # Small problems: BLAS threads only add overhead to L-BFGS here.
    with threadpool_limits(1):
        model = fit_routing_model(segments, trace.model.num_experts, [_top_k_weights(trace, r) for r in chosen],
                                  seed=seed)
        if request_spread is None:
            request_spread = fit_request_spread(model, segments, seed)
    return FittedSource(trace, model, request_spread)


def kmeans(points: np.ndarray, clusters: int, rng: np.random.Generator, iterations: int = 30) -> np.ndarray:
    """Cluster labels of k-means (k-means++ start, Lloyd iterations)."""
    clusters = min(clusters, len(points))
    centers = [points[rng.integers(len(points))]]
    for _ in range(1, clusters):
        distance = np.min([((points - c) ** 2).sum(axis=1) for c in centers], axis=0)
        centers.append(points[rng.choice(len(points), p=distance / distance.sum())] if distance.sum() > 0 else
                       points[rng.integers(len(points))])
    centers = np.array(centers)
    labels = np.zeros(len(points), dtype=np.int64)
    for _ in range(iterations):
        labels = ((points[:, None, :] - centers[None]) ** 2).sum(axis=-1).argmin(axis=1)
        for c in range(clusters):
            if (labels == c).any():
                centers[c] = points[labels == c].mean(axis=0)
    return labels


def _draw_requests(workload: Workload, options: SynthOptions, rng: np.random.Generator) -> np.ndarray:
    replace = options.requests > len(workload)
    return rng.choice(len(workload), size=options.requests, replace=replace)


def _topics(workload: Workload, options: SynthOptions, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Topic of each chosen row: its embedding's cluster over the whole workload, or random without embeddings."""
    if workload.embeddings is None:
        return rng.integers(options.topics, size=len(rows))
    return kmeans(workload.embeddings, options.topics, rng)[rows]


def synthesize(source: FittedSource, out_dir: str | Path, options: SynthOptions, overwrite: bool = False,
               progress: bool = True, workload: Workload | None = None) -> Path:
    """Write a trace of options.requests requests drawn from the workload (options.lengths unless given)."""
    model, spec = source.model, source.trace.model
    rng = np.random.default_rng(options.seed)
    workload = workload or load_workload(options.lengths)
    rows, prompt, output = _workload_lengths(workload, options, rng)
    decode = decode_iterations(prompt, output)
    topics = _topics(workload, options, rows, rng)
    layers, experts = spec.num_layers, spec.num_experts
    topic_offsets = request_offsets(1.0, options.topics, layers, experts, rng)
    own_offsets = request_offsets(1.0, len(rows), layers, experts, rng)
    offsets = source.request_spread * (np.sqrt(options.topic_share) * topic_offsets[topics]
                                       + np.sqrt(1 - options.topic_share) * own_offsets)

    writer = TraceWriter(out_dir, spec, _provenance(source, workload, options, rows), topm=spec.top_k,
                         default_embedding=EMBEDDING_NAME if workload.embeddings is not None else None,
                         overwrite=overwrite)
    # Batches of similar lengths: every request of a batch is generated for the longest one's steps.
    order = np.argsort(prompt + decode, kind="stable")
    routed: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    batches = [order[i:i + BATCH_REQUESTS] for i in range(0, len(order), BATCH_REQUESTS)]
    for batch in tqdm(batches, desc="generating routing", unit="batch", disable=not progress, leave=False):
        for i, result in zip(batch, sample_routing(model, (prompt + decode)[batch], rng, offsets=offsets[batch])):
            routed[int(i)] = result
    for i in range(len(rows)):
        chosen, weights = routed[i]
        probs = np.zeros(chosen.shape[:2] + (experts,), dtype=np.float32)
        np.put_along_axis(probs, chosen.astype(np.int64), weights, axis=-1)
        p = int(prompt[i])
        embedding = None if workload.embeddings is None else {EMBEDDING_NAME: workload.embeddings[rows[i]]}
        request = dict(request_id=f"{workload.name}-{rows[i]}", dataset=workload.name, prompt_tokens=p,
                       output_tokens=int(output[i]), embeddings=embedding)
        if options.prefill == "rows":
            writer.add_request(probs=probs, experts=chosen, prefill_iters=p, **request)
        else:
            writer.add_request(probs=probs[p:], experts=chosen[p:], prefill_iters=0,
                               prefill_counts=tally_experts(chosen[:p], experts), **request)
    return writer.close(extra={"topics": topics.tolist(), "workload_rows": rows.tolist()})


def _workload_lengths(workload: Workload, options: SynthOptions,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = _draw_requests(workload, options, rng)
    prompt, output = workload.prompt_tokens[rows], workload.output_tokens[rows]
    if options.max_prompt_tokens is not None:
        prompt = np.minimum(prompt, options.max_prompt_tokens)
    if options.max_output_tokens is not None:
        output = np.minimum(output, options.max_output_tokens)
    return rows, prompt, output


def synthesize_conditioned(trace: Trace, model: ConditionedModel, out_dir: str | Path, options: SynthOptions,
                           overwrite: bool = False, workload: Workload | None = None) -> Path:
    """Write a trace of options.requests workload requests whose decode routing traces.conditioned
    draws from the fitted trace's requests nearest each prompt's embedding. Decode only: the source
    records no prompt routing to copy, so the trace records none (prefill_recorded false)."""
    workload = workload or load_workload(options.lengths)
    if workload.embeddings is None:
        raise UserError(f"--routing conditioned needs the workload's prompt embeddings; {workload.name} has none")
    if trace.meta.default_embedding != EMBEDDING_NAME or model.embeddings is None:
        raise UserError(f"--routing conditioned: {trace.path} has no {EMBEDDING_NAME} prompt embeddings to "
                        f"match the workload's")
    rng = np.random.default_rng(options.seed)
    rows, prompt, output = _workload_lengths(workload, options, rng)
    decode = decode_iterations(prompt, output)
    spec = trace.model
    writer = TraceWriter(out_dir, spec, _conditioned_provenance(trace, model, workload, options, rows),
                         topm=spec.top_k, default_embedding=EMBEDDING_NAME, overwrite=overwrite)
    made = generate(model, workload.embeddings[rows], decode, options.seed)
    for i, (chosen, weights) in enumerate(made):
        probs = np.zeros(chosen.shape[:2] + (spec.num_experts,), dtype=np.float32)
        np.put_along_axis(probs, chosen, weights, axis=-1)
        writer.add_request(request_id=f"{workload.name}-{rows[i]}", dataset=workload.name,
                           prompt_tokens=int(prompt[i]), output_tokens=int(output[i]), probs=probs, experts=chosen,
                           embeddings={EMBEDDING_NAME: workload.embeddings[rows[i]]})
    return writer.close(extra={"workload_rows": rows.tolist()})


def _conditioned_provenance(trace: Trace, model: ConditionedModel, workload: Workload, options: SynthOptions,
                            rows: np.ndarray) -> Provenance:
    return Provenance(
        model=f"synthetic routing drawn from {trace.source.model}",
        weights_origin=f"none: traces.conditioned on {trace.path.name} ({trace.num_iterations} real iterations)",
        dataset=f"{workload.name} (real lengths and prompt embeddings)",
        tool="traces.synth",
        notes=(f"Real: prompt and output token counts of {len(rows)} rows of the {workload.description}, and their "
               f"prompt embeddings ({workload.embedding_model}). Synthetic: every expert choice and weight, "
               f"decode only: runs of token rows copied from the {model.neighbours} request(s) of {trace.path.name} "
               f"whose prompts are nearest each prompt, a share {model.resample} of (token, layer) cells redrawn "
               f"from their source's other tokens (fitted on a split of {trace.path.name}); no prefill routing."),
        details={"source_trace": trace.path.name, "source_origin": trace.source.label(), "routing": "synthetic",
                 "routing_model": model.describe(), "workload": workload.name, "seed": options.seed,
                 "max_prompt_tokens": options.max_prompt_tokens, "max_output_tokens": options.max_output_tokens},
    )


def _provenance(source: FittedSource, workload: Workload, options: SynthOptions, rows: np.ndarray) -> Provenance:
    src = source.trace
    caps = ", ".join(f"{name} capped at {value}" for name, value in (
        ("prompts", options.max_prompt_tokens), ("outputs", options.max_output_tokens)) if value is not None)
    real = f"prompt and output token counts of {len(rows)} rows of the {workload.description}"
    if workload.embeddings is not None:
        real += f", and their prompt embeddings ({workload.embedding_model}, of the real prompts)"
    prefill = ("every prompt token is a generated prefill iteration" if options.prefill == "rows" else
               "prompt tokens' routing generated and kept only as per-expert prefill counts")
    details: dict[str, Any] = {
        "source_trace": src.path.name, "source_origin": src.source.label(),
        "source_requests": src.num_requests, "source_iterations": src.num_iterations,
        "routing_model": source.model.describe(), "request_spread": source.request_spread,
        "request_spread_fitted": options.request_spread is None,
        "topics": options.topics, "topic_share": options.topic_share, "prefill": options.prefill,
        "max_prompt_tokens": options.max_prompt_tokens, "max_output_tokens": options.max_output_tokens,
        "seed": options.seed, "workload": workload.name,
    }
    return Provenance(
        model=f"synthetic routing fitted to {src.source.model}",
        weights_origin=f"none: traces.synth model fitted on {src.path.name} ({src.num_iterations} real iterations)",
        dataset=f"{workload.name} (real lengths{' and prompt embeddings' if workload.embeddings is not None else ''})",
        tool="traces.synth",
        notes=(f"Real: {real}. Synthetic: every expert choice and weight ({prefill}), drawn from a routing model "
               f"fitted by maximum likelihood to {src.path.name} ({src.source.label()}); per-request offsets of "
               f"spread {source.request_spread} (fitted to how much the source's requests differ), a share "
               f"{options.topic_share} of their variance common to the requests of one of {options.topics} "
               f"prompt-embedding clusters (an assumption, not fitted); only the top-{src.model.top_k} weights are "
               f"kept{'; ' + caps if caps else ''}."),
        details=details,
    )


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments (the README's command lines are checked against it)."""
    defaults = SynthOptions(requests=1)
    parser = ArgumentParser(prog="python -m traces.synth", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fit", required=True, metavar="TRACE_DIR", help="trace to fit (a shipped name or a directory)")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    parser.add_argument("--requests", type=int, required=True, help="requests to write (drawn from the workload)")
    parser.add_argument("--lengths", default=defaults.lengths, help="sharegpt, lmsys, or a workload file")
    parser.add_argument("--max-prompt-tokens", type=int, help="cap on a request's prompt tokens")
    parser.add_argument("--max-output-tokens", type=int, help="cap on a request's output tokens")
    parser.add_argument("--prefill", choices=PREFILL_MODES, default=defaults.prefill,
                        help="prompt tokens as one row each, or as per-expert counts only")
    parser.add_argument("--topics", type=int, default=defaults.topics, help="k-means clusters of prompt embeddings")
    parser.add_argument("--topic-share", type=float, default=defaults.topic_share,
                        help="share of a request's offset variance common to its topic (0..1)")
    parser.add_argument("--request-spread", type=float, help="per-request logit offset spread (default: fitted)")
    parser.add_argument("--routing", choices=ROUTINGS, default=defaults.routing,
                        help="model: the fitted routing model; conditioned: copied from the trace's requests "
                             "nearest each prompt (decode only; needs prompt embeddings)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)

    def work() -> None:
        from traces.defaults import resolve_trace

        options = SynthOptions(
            requests=args.requests, lengths=args.lengths, max_prompt_tokens=args.max_prompt_tokens,
            max_output_tokens=args.max_output_tokens, prefill=args.prefill, topics=args.topics,
            topic_share=args.topic_share, request_spread=args.request_spread, routing=args.routing, seed=args.seed)
        load_workload(options.lengths)  # a bad workload fails before the fit
        trace = load_trace(resolve_trace(args.fit))
        print(f"fitting the {options.routing} routing to {trace.path} ({trace.num_iterations} iterations)...")
        if options.routing == "conditioned":
            model = fit_conditioned(*training_parts(trace), trace.model.num_experts, options.seed)
            out = synthesize_conditioned(trace, model, args.out_dir, options, overwrite=args.overwrite)
        else:
            source = fit_source(trace, options.seed, request_spread=options.request_spread)
            out = synthesize(source, args.out_dir, options, overwrite=args.overwrite)
        realism = load_trace(out).meta.realism
        distance = realism.get("distance_to_real")
        print(f"wrote {out}: token reuse {realism['token_reuse']:.1%}, distance to real routing "
              f"{'unknown (no real trace of this shape)' if distance is None else f'{distance:.1%}'}")

    run_cli(work)


if __name__ == "__main__":
    main()
