"""How close prompt-conditioned routing (traces.conditioned) comes to held-out real routing.

    python -m traces.conditioned_check --fit TRACE --held-out TRACE [--seed 0]

fits on every request of --fit and generates, for every request of --held-out whose request id
--fit does not hold, routing from its prompt embedding and its decode length; prints every figure
(traces.stats.segment_figures) of the held-out real requests and of the generated ones, and the
relative error. With a --fit trace of two requests and no --held-out: leave-one-out (fit on one,
generate the other, both generated sequences measured together against both real ones).
"""
from __future__ import annotations

import argparse

import numpy as np

from traces.cli import ArgumentParser, run_cli
from traces.conditioned import fit_conditioned, generate, training_parts
from traces.defaults import resolve_trace
from traces.format import Trace, load_trace
from traces.stats import relative_errors, segment_figures


def held_out(fit: Trace, test: Trace, seed: int) -> tuple[dict, dict, dict]:
    segments, weights, embeddings = training_parts(fit)
    model = fit_conditioned(segments, weights, embeddings, fit.model.num_experts, seed)
    fitted_ids = set(fit.requests["request_id"].astype(str))
    index = [i for i, rid in enumerate(test.requests["request_id"].astype(str)) if rid not in fitted_ids]
    t_segments, _, t_embeddings = training_parts(test)
    t_embeddings = None if t_embeddings is None else t_embeddings[index]
    real = [t_segments[i] for i in index]
    made = generate(model, t_embeddings, np.array([len(s) for s in real]), seed)
    spec = fit.model
    return (segment_figures(real, t_embeddings, spec.num_experts, spec.top_k),
            segment_figures([m[0] for m in made], t_embeddings, spec.num_experts, spec.top_k), model.describe())


def leave_one_out(trace: Trace, seed: int) -> tuple[dict, dict, list[dict]]:
    segments, weights, _ = training_parts(trace)
    made, models = [], []
    for r in range(len(segments)):
        others = [i for i in range(len(segments)) if i != r]
        model = fit_conditioned([segments[i] for i in others], [weights[i] for i in others], None,
                                trace.model.num_experts, seed)
        models.append(model.describe())
        made.append(generate(model, None, np.array([len(segments[r])]), seed + r)[0][0])
    spec = trace.model
    return (segment_figures(segments, None, spec.num_experts, spec.top_k),
            segment_figures(made, None, spec.num_experts, spec.top_k), models)


def _flat(figures: dict) -> dict:
    out = {}
    for key, value in figures.items():
        if isinstance(value, dict):
            out |= {f"{key}[{s}]": v for s, v in value.items()}
        else:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m traces.conditioned_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fit", required=True)
    parser.add_argument("--held-out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    def work() -> None:
        fit = load_trace(resolve_trace(args.fit))
        real, ours, models = (held_out(fit, load_trace(resolve_trace(args.held_out)), args.seed) if args.held_out
                      else leave_one_out(fit, args.seed))
        errors = relative_errors(ours, real)
        print(f"fitted: {models}")
        print(f"{'figure':32s} {'real':>9s} {'generated':>9s} {'error':>8s}")
        flat_real, flat_ours = _flat(real), _flat(ours)
        for key, value in flat_real.items():
            if value is None:
                continue
            err = errors.get(key)
            print(f"{key:32s} {value:9.4f} {flat_ours[key]:9.4f} {'' if err is None else f'{err:+8.1%}'}")
        worst = max(abs(e) for e in errors.values())
        print(f"largest relative error: {worst:.1%} over {len(errors)} figures")

    run_cli(work)


if __name__ == "__main__":
    main()
