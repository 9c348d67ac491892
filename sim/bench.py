"""Simulator speed: simulated layer-iterations per wall-clock second, and where the time goes.

    python -m sim.bench [--requests 100] [--profile]
    python -m sim.bench --scale [--requests 1000] [--rate 0.05]

Replays a synthetic Mixtral-shape trace (100 requests by default) under several policies and
budgets and prints, per run, layer-iterations per second and the ratio to the 100k/s aim. With
--profile, one LRU run is profiled and its time split by component (SimPy core, engine, link and
copy queue, cache, policy, other).

--scale: ShareGPT-length requests (1,000 by default; routing fitted to the real Mixtral sample by
traces.synth) arriving by a Poisson process on the paper's 6x RTX 3090 testbed with continuous batching; prints wall time and simulated output tokens per
wall-clock second, then how the cost grows with the number of requests, of GPUs and the batch cap.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from sim.api import simulate
from sim.config import SimConfig
from traces import load_trace
from traces.cli import console as cli_console
from traces.model_spec import load_model_spec
from traces.synthetic import SyntheticParams, generate_synthetic
from traces.defaults import resolve_trace
from traces.synth import SynthOptions, fit_source, synthesize

AIM_PER_S = 100_000
RUNS = [("lru", "6GB"), ("lru", "128experts"), ("belady", "128experts"), ("all_resident", "6GB")]
COMPONENTS = [("simpy", "SimPy core"), ("sim/engine", "engine"), ("sim/layer_protocol", "engine"),
              ("sim/link", "link + copy queue"), ("sim/copy_queue", "link + copy queue"), ("sim/cache", "cache"),
              ("policies/", "policy")]


def component_times(stats: pstats.Stats) -> dict[str, float]:
    """Own time per component, from a profile."""
    totals: dict[str, float] = {}
    for (filename, _, _), (_, _, own, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        name = next((label for key, label in COMPONENTS if key in filename), "other (numpy, builtins, ...)")
        totals[name] = totals.get(name, 0.0) + own
    return totals


def scale(requests: int, rate_rps: float, console: Console) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        source = fit_source(load_trace(resolve_trace("mixtral-8x7b-gsm8k")))
        trace = load_trace(synthesize(source, Path(tmp) / "scale", SynthOptions(requests=requests, prefill="counts")))
        console.print(f"generated {requests} ShareGPT-length requests with routing fitted to real Mixtral "
                      f"({trace.num_iterations:,} iterations) in {time.perf_counter() - started:.0f} s")
        base = SimConfig(trace=tmp, policy="lru", budget="6GB", hardware="rtx3090x6", arrival="poisson",
                         rate_rps=rate_rps, max_batch=16, seed=0)
        table = Table(title=f"rtx3090x6, lru 6GB per GPU, Poisson {rate_rps} req/s")
        for column in ("requests", "GPUs", "max batch", "passes", "sim tokens", "sim time s", "wall s",
                       "sim tokens / wall s", "layer-passes / wall s"):
            table.add_column(column, justify="right")
        small = max(1, requests // 4)
        runs = [(requests, None, 16)] + [(n, None, 16) for n in (small, requests // 2)] + \
               [(small, g, 16) for g in (1, 2)] + [(small, None, b) for b in (1, 4)]
        for n, gpus, batch in runs:
            result = simulate(replace(base, max_requests=n, gpus=gpus, max_batch=batch), trace=trace)
            m = result.metrics
            tokens = int(result.per_request["output_tokens"].sum())
            table.add_row(str(n), str(m.gpus), str(batch), f"{m.steps:,}", f"{tokens:,}", f"{m.makespan_s:,.0f}",
                          f"{result.wall_s:.1f}", f"{tokens / result.wall_s:,.0f}",
                          f"{m.layer_iterations / result.wall_s:,.0f}")
        console.print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sim.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--profile", action="store_true", help="also split an LRU run's time by component")
    parser.add_argument("--scale", action="store_true", help="ShareGPT-length requests on rtx3090x6 with batching")
    parser.add_argument("--rate", type=float, default=0.05, help="--scale: Poisson arrivals per second")
    args = parser.parse_args(argv)
    console = cli_console()
    if args.scale:
        scale(args.requests if args.requests != 100 else 1000, args.rate, console)
        return
    with tempfile.TemporaryDirectory() as tmp:
        params = SyntheticParams(requests=args.requests, prompt_tokens=(16, 256), output_tokens=(32, 256), seed=0)
        trace = load_trace(generate_synthetic(Path(tmp) / "bench", load_model_spec("mixtral-8x7b"), params))
        table = Table(title=f"simulator speed: {args.requests} synthetic Mixtral-shape requests, "
                            f"{trace.num_iterations:,} iterations")
        for column in ("policy", "budget", "hit rate", "layer-iters", "wall s", "iters/s", "vs aim"):
            table.add_column(column, justify="right")
        for policy, budget in RUNS:
            result = simulate(SimConfig(trace=tmp, policy=policy, budget=budget), trace=trace)
            rate = result.metrics.layer_iterations / result.wall_s
            table.add_row(policy, budget, f"{result.metrics.hit_rate:.1%}", f"{result.metrics.layer_iterations:,}",
                          f"{result.wall_s:.2f}", f"{rate:,.0f}", f"{rate / AIM_PER_S:.2f}x")
        console.print(table)
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            simulate(SimConfig(trace=tmp, policy="lru", budget="6GB", max_requests=max(1, args.requests // 5)), trace=trace)
            profiler.disable()
            totals = component_times(pstats.Stats(profiler))
            whole = sum(totals.values())
            split = Table(title="where an LRU run's time goes (own time, under the profiler)")
            split.add_column("component")
            split.add_column("share", justify="right")
            for name, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
                split.add_row(name, f"{seconds / whole:.0%}")
            console.print(split)


if __name__ == "__main__":
    main()
