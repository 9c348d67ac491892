"""A parametric routing generator with controllable locality, for tests and for studying policies.

    python -m traces.synthetic OUT_DIR --model mixtral-8x7b --requests 100 [--stickiness 1.0 ...]

Each request belongs to a topic; its prompt embedding is the topic's centroid plus noise. For every
token (prompt tokens first, as prefill iterations, then output tokens) and layer, the router's
logits are
    topic_strength * log pi[topic, layer] + layer_correlation * log T[layer][top-1 of layer-1]
    + stickiness * [expert chosen by the previous token at this layer] + temperature * Gumbel noise
and the router probabilities are their softmax; the top-k of those are the experts run. pi are
per-topic popularities (Dirichlet, `skew` lowers the concentration), T per-layer transition
matrices. All zero knobs give uniform random routing. This is NOT fitted to real routing: use
traces.synth for realistic traces, and label results accordingly.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from traces.cli import ArgumentParser, run_cli
from traces.errors import UserError
from traces.format import Provenance, TraceWriter
from traces.model_spec import ModelSpec, load_model_spec


@dataclass(frozen=True)
class SyntheticParams:
    requests: int = 20
    prompt_tokens: tuple[int, int] = (8, 64)  # inclusive range, uniform
    output_tokens: tuple[int, int] = (8, 64)
    skew: float = 1.0  # 0: uniform popularity; larger: fewer popular experts per layer
    topics: int = 4
    topic_strength: float = 1.0
    layer_correlation: float = 0.5
    stickiness: float = 1.0
    temperature: float = 1.0
    embedding_dim: int = 16
    embedding_noise: float = 0.3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.requests < 1 or self.topics < 1 or self.embedding_dim < 1:
            raise UserError("synthetic trace: requests, topics and embedding_dim must be at least 1")
        for name in ("prompt_tokens", "output_tokens"):
            low, high = getattr(self, name)
            if not 0 <= low <= high or (name == "output_tokens" and high < 1):
                raise UserError(f"synthetic trace: {name} range {low}..{high} is invalid")
        if min(self.skew, self.topic_strength, self.layer_correlation, self.stickiness, self.temperature) < 0:
            raise UserError("synthetic trace: skew, topic_strength, layer_correlation, stickiness and temperature must be >= 0")


def decode_iterations(prompt_tokens: np.ndarray, output_tokens: np.ndarray) -> np.ndarray:
    """Decode rows of requests: the prefill pass emits the first output token, so a request with a
    prompt decodes output - 1 tokens; without a prompt every output token is a decode row."""
    return np.where(prompt_tokens > 0, output_tokens - 1, output_tokens)


def _log_dirichlet(rng: np.random.Generator, skew: float, shape: tuple[int, ...], experts: int) -> np.ndarray:
    if skew == 0:
        return np.full(shape + (experts,), -np.log(experts))
    draws = rng.dirichlet(np.full(experts, 1.0 / skew), size=shape)
    return np.log(np.maximum(draws, 1e-9))


@dataclass(frozen=True)
class RoutingModel:
    """What all requests share: per-topic popularity, per-layer transitions, topic centroids."""

    topic_pop: np.ndarray  # [topics, layers, experts] log-probabilities
    transition: np.ndarray  # [layers, experts (of the layer above), experts] log-probabilities
    centroids: np.ndarray  # [topics, embedding_dim]

    @classmethod
    def draw(cls, model: ModelSpec, params: SyntheticParams, rng: np.random.Generator) -> RoutingModel:
        layers, experts = model.num_layers, model.num_experts
        return cls(_log_dirichlet(rng, params.skew, (params.topics, layers), experts),
                   _log_dirichlet(rng, params.skew, (layers, experts), experts),
                   rng.normal(size=(params.topics, params.embedding_dim)))


def generate_routing(model: ModelSpec, params: SyntheticParams, shared: RoutingModel, topic: np.ndarray,
                     lengths: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Router probabilities [requests, steps, layers, experts] and top-k experts of a group of requests."""
    layers, experts, k = model.num_layers, model.num_experts, model.top_k
    r, steps = len(topic), int(lengths.max())
    probs = np.zeros((r, steps, layers, experts), dtype=np.float32)
    chosen = np.zeros((r, steps, layers, k), dtype=np.int64)
    rows = np.arange(r)
    previous = np.zeros((r, layers, experts), dtype=bool)
    for t in range(steps):
        upper = None
        for layer in range(layers):
            logits = params.topic_strength * shared.topic_pop[topic, layer]
            if upper is not None:
                logits = logits + params.layer_correlation * shared.transition[layer, upper]
            logits = logits + params.stickiness * previous[:, layer]
            logits = logits + params.temperature * rng.gumbel(size=(r, experts))
            logits -= logits.max(axis=1, keepdims=True)
            p = np.exp(logits)
            p /= p.sum(axis=1, keepdims=True)
            top = np.argsort(-p, axis=1, kind="stable")[:, :k]
            probs[:, t, layer] = p
            chosen[:, t, layer] = top
            previous[:, layer] = False
            previous[rows[:, None], layer, top] = True
            upper = top[:, 0]
    return probs, chosen


GROUP = 32  # requests generated together: bounds memory for long traces


def generate_synthetic(out_dir: str | Path, model: ModelSpec, params: SyntheticParams, overwrite: bool = False,
                       lengths: list[tuple[int, int]] | None = None, workload: str | None = None) -> Path:
    """Write a synthetic trace; `lengths` gives each request's (prompt, output) tokens (else drawn
    uniformly from the params' ranges), `workload` names where those lengths came from."""
    rng = np.random.default_rng(params.seed)
    shared = RoutingModel.draw(model, params, rng)
    r = params.requests
    topic = rng.integers(params.topics, size=r)
    embeddings = (shared.centroids[topic] + params.embedding_noise * rng.normal(size=(r, params.embedding_dim)))
    if lengths is None:
        prompt = rng.integers(params.prompt_tokens[0], params.prompt_tokens[1] + 1, size=r)
        output = rng.integers(params.output_tokens[0], params.output_tokens[1] + 1, size=r)
        workload = workload or (f"synthetic: prompt {params.prompt_tokens[0]}-{params.prompt_tokens[1]} tokens, "
                                f"output {params.output_tokens[0]}-{params.output_tokens[1]} tokens")
    else:
        if len(lengths) < r:
            raise UserError(f"synthetic trace: {r} requests but only {len(lengths)} (prompt, output) lengths")
        prompt, output = (np.asarray(column) for column in zip(*lengths[:r]))
        if (output < 1).any() or (prompt < 0).any():
            raise UserError("synthetic trace: every request needs >= 1 output token and >= 0 prompt tokens")
    total = prompt + decode_iterations(prompt, output)
    source = Provenance(
        model=f"synthetic routing for the {model.name} shape",
        weights_origin="none: parametric generator (traces.synthetic), not fitted to real routing",
        dataset=workload or "given lengths",
        tool="traces.synthetic",
        details={"params": asdict(params)},
    )
    # Requests of similar length are generated together (little padding); written in their order.
    routing: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    by_length = np.argsort(total, kind="stable")
    for start in range(0, r, GROUP):
        group = by_length[start:start + GROUP]
        probs, chosen = generate_routing(model, params, shared, topic[group], total[group], rng)
        for j, i in enumerate(group):
            routing[int(i)] = probs[j, :total[i]].astype(np.float16), chosen[j, :total[i]]
    writer = TraceWriter(out_dir, model, source, default_embedding="topic", overwrite=overwrite)
    for i in range(r):
        probs, chosen = routing.pop(i)
        writer.add_request(
            request_id=f"synthetic-{i}", dataset="synthetic", probs=probs, experts=chosen,
            prefill_iters=int(prompt[i]), prompt_tokens=int(prompt[i]), output_tokens=int(output[i]),
            embeddings={"topic": embeddings[i].astype(np.float32)},
        )
    return writer.close(extra={"topics": topic.tolist()})


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments (the README's command lines are checked against it)."""
    defaults = SyntheticParams()
    parser = ArgumentParser(prog="python -m traces.synthetic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--model", default="mixtral-8x7b", help="model profile name or transformers config.json")
    parser.add_argument("--requests", type=int, default=defaults.requests)
    parser.add_argument("--prompt-tokens", type=int, nargs=2, default=defaults.prompt_tokens, metavar=("MIN", "MAX"))
    parser.add_argument("--output-tokens", type=int, nargs=2, default=defaults.output_tokens, metavar=("MIN", "MAX"))
    for name in ("skew", "topic_strength", "layer_correlation", "stickiness", "temperature", "embedding_noise"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    parser.add_argument("--topics", type=int, default=defaults.topics)
    parser.add_argument("--embedding-dim", type=int, default=defaults.embedding_dim)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--overwrite", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)

    def work() -> None:
        params = SyntheticParams(
            requests=args.requests, prompt_tokens=tuple(args.prompt_tokens), output_tokens=tuple(args.output_tokens),
            skew=args.skew, topics=args.topics, topic_strength=args.topic_strength,
            layer_correlation=args.layer_correlation, stickiness=args.stickiness, temperature=args.temperature,
            embedding_dim=args.embedding_dim, embedding_noise=args.embedding_noise, seed=args.seed)
        print(f"wrote {generate_synthetic(args.out_dir, load_model_spec(args.model), params, args.overwrite)}")

    run_cli(work)


if __name__ == "__main__":
    main()
