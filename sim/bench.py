"""Simulator speed: layer-iterations per CPU-second for each policy on each engine, against SimPy's bare event rate.

    python -m sim.bench [--requests 10] [--profile]
    python -m sim.bench --scale [--requests 1000] [--rate 0.05]

First measures SimPy's bare event rate here (a process yielding timeouts), then replays the default
trace at 6 GB under every policy: on the SimPy engine (the reference, the first --requests
requests) and, for the policies that declare a fast path (sim.fast), on the fast engine (every
request of the trace). CPU-seconds are time.process_time over the whole run (setup included);
the ratio to SimPy's event rate, measured in the same run, is what carries across machines.
With --profile, one LRU run on the SimPy engine is profiled and its time split by component.

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

import simpy
from rich.console import Console
from rich.table import Table

from policies import make_policy
from policies.registry import available
from sim.api import simulate
from sim.config import SimConfig
from traces import load_trace
from traces.cli import ArgumentParser, console as cli_console
from traces.defaults import resolve_trace
from traces.shared import shared_trace
from traces.synth import SynthOptions, fit_source, synthesize

BUDGET = "6GB"
HARDWARE = SimConfig().hardware  # the default, measured profile (compute warm-up after waits included)
RUNS = [("lru", {}), ("lru", {"scope": "global"}), ("all_resident", {}), ("belady", {}), ("deepspeed", {}),
        ("oracle_prefetch", {}), ("mixtral_offload", {}), ("promoe", {}), ("moepic", {}), ("finemoe", {}),
        ("moe_infinity", {})]
COMPONENTS = [("simpy", "SimPy core"), ("sim/engine", "engine"), ("sim/layer_protocol", "engine"),
              ("sim/link", "link + copy queue"), ("sim/copy_scheduler", "link + copy queue"),
              ("sim/copy_queue", "link + copy queue"), ("sim/cache", "cache"),
              ("policies/", "policy")]


def component_times(stats: pstats.Stats) -> dict[str, float]:
    """Own time per component, from a profile."""
    totals: dict[str, float] = {}
    for (filename, _, _), (_, _, own, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        name = next((label for key, label in COMPONENTS if key in filename), "other (numpy, builtins, ...)")
        totals[name] = totals.get(name, 0.0) + own
    return totals


def simpy_event_rate(events: int = 300_000) -> float:
    """Timeouts per CPU-second that a bare SimPy process gets here: the ceiling of any engine built on it."""
    env = simpy.Environment()

    def ticker():
        for _ in range(events):
            yield env.timeout(1.0)

    env.process(ticker())
    started = time.process_time()
    env.run()
    return events / (time.process_time() - started)


def policy_label(policy: str, params: dict) -> str:
    return policy + "".join(f" {k}={v}" for k, v in params.items())


def speeds(requests: int, console: Console) -> None:
    """Every policy on each engine it runs on, in layer-iterations per CPU-second."""
    trace = shared_trace(resolve_trace("default"))
    rate = simpy_event_rate()
    console.print(f"SimPy bare event rate here: {rate:,.0f} timeouts per CPU-second")
    table = Table(title=f"default trace ({trace.path.name}, {trace.num_requests} requests), hardware {HARDWARE}, "
                        f"budget {BUDGET}, layer-iterations per CPU-second")
    for column in ("policy", "engine", "requests", "layer-iters", "CPU s", "iters/s", "vs SimPy events/s",
                   "hit rate"):
        table.add_column(column, justify="right")
    simulate(SimConfig(policy="lru", budget=BUDGET, hardware=HARDWARE, max_requests=1))  # loads the compiled kernel
    for policy, params in RUNS:
        if policy not in available():
            continue
        train = 0.5 if make_policy(policy, **params).needs_training else 0.0
        fast = type(make_policy(policy, **params)).__dict__.get("fast_path") is not None
        for engine in (("fast", "simpy") if fast else ("simpy",)):
            cfg = SimConfig(policy=policy, policy_params=params, budget=BUDGET, hardware=HARDWARE, engine=engine,
                            train_fraction=train,
                            max_requests=None if engine == "fast" else requests)
            started = time.process_time()
            result = simulate(cfg, trace=trace)
            cpu = time.process_time() - started
            m = result.metrics
            ran = m.policy_info.get("engine", engine)
            table.add_row(policy_label(policy, params), ran if len(ran) < 20 else ran[:18] + "..", str(m.requests),
                          f"{m.layer_iterations:,}", f"{cpu:.2f}", f"{m.layer_iterations / cpu:,.0f}",
                          f"{m.layer_iterations / cpu / rate:.3f}", f"{m.hit_rate:.1%}")
    console.print(table)


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


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments (the README's command lines are checked against it)."""
    parser = ArgumentParser(prog="python -m sim.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10, help="requests replayed on the SimPy engine")
    parser.add_argument("--profile", action="store_true", help="also split an LRU run's time by component")
    parser.add_argument("--scale", action="store_true", help="ShareGPT-length requests on rtx3090x6 with batching")
    parser.add_argument("--rate", type=float, default=0.05, help="--scale: Poisson arrivals per second")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    console = cli_console()
    if args.scale:
        scale(args.requests if args.requests != 10 else 1000, args.rate, console)
        return
    speeds(args.requests, console)
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        simulate(SimConfig(policy="lru", budget=BUDGET, max_requests=max(1, args.requests // 2), engine="simpy"))
        profiler.disable()
        totals = component_times(pstats.Stats(profiler))
        whole = sum(totals.values())
        split = Table(title="where an LRU run's time goes on the SimPy engine (own time, under the profiler)")
        split.add_column("component")
        split.add_column("share", justify="right")
        for name, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
            split.add_row(name, f"{seconds / whole:.0%}")
        console.print(split)


if __name__ == "__main__":
    main()
