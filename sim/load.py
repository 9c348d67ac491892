"""Latency against load: Poisson arrivals at rising rates, with continuous batching.

    python -m sim.load [--policy lru] [--budget 6GB] [--hardware h100] [--trace default]
                       [--max-batch 8] [--rates 0.01,0.02 | --fractions 0.25,0.5,...] [--out DIR]

First measures the capacity (requests per second with max_batch clients always waiting), then runs
Poisson arrivals at fractions of it (or at the given rates) and writes load_curve.csv/.md and
load_curve.png/.svg: TTFT and TPOT percentiles and throughput against the offered rate.
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from tqdm import tqdm  # noqa: E402

from sim.api import prepare, simulate  # noqa: E402
from sim.config import DEFAULT_HARDWARE, SimConfig  # noqa: E402
from sim.report import atomic_save_figure, atomic_write_csv, atomic_write_text  # noqa: E402
from traces.cli import ArgumentParser, run_cli  # noqa: E402

DEFAULT_FRACTIONS = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.2)


def capacity_rps(cfg: SimConfig) -> float:
    """Requests per second when max_batch clients keep the server full."""
    metrics = simulate(replace(cfg, arrival="closed", clients=cfg.max_batch)).metrics
    return metrics.requests / metrics.makespan_s


def load_curve(cfg: SimConfig, rates: list[float]) -> pd.DataFrame:
    prepared = prepare(cfg)  # validate once, before any run
    rows = []
    for rate in tqdm(rates, desc="offered load", unit="rate"):
        m = simulate(replace(cfg, arrival="poisson", rate_rps=rate), trace=prepared.trace).metrics
        rows.append({"offered_rate_rps": rate, "throughput_tokens_per_s": m.throughput_tokens_per_s,
                     "hit_rate": m.hit_rate, "ttft_p50_s": m.ttft_p50_s, "ttft_p99_s": m.ttft_p99_s,
                     "tpot_p50_s": m.tpot_p50_s, "tpot_p99_s": m.tpot_p99_s, "e2e_p50_s": m.e2e_p50_s,
                     "e2e_p99_s": m.e2e_p99_s})
    return pd.DataFrame(rows)


def plot(curve: pd.DataFrame, title: str, out: Path) -> None:
    fig, (lat, thr) = plt.subplots(1, 2, figsize=(11, 4))
    for column, style in (("ttft_p50_s", "o-"), ("ttft_p99_s", "o--"), ("tpot_p50_s", "s-"), ("tpot_p99_s", "s--")):
        lat.plot(curve["offered_rate_rps"], curve[column], style, label=column)
    lat.set(xlabel="offered load (requests/s)", ylabel="latency (s)", yscale="log", title="latency")
    lat.legend()
    thr.plot(curve["offered_rate_rps"], curve["throughput_tokens_per_s"], "o-")
    thr.set(xlabel="offered load (requests/s)", ylabel="throughput (output tokens/s)", title="throughput")
    fig.suptitle(title)
    fig.tight_layout()
    for suffix in ("png", "svg"):
        atomic_save_figure(fig, out / f"load_curve.{suffix}")
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments (the README's command lines are checked against it)."""
    parser = ArgumentParser(prog="python -m sim.load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", default="lru")
    parser.add_argument("--budget", default="6GB")
    parser.add_argument("--hardware", default=DEFAULT_HARDWARE)
    parser.add_argument("--trace", default="default")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-requests", type=int, default=None)
    parser.add_argument("--rates", help="comma-separated requests/s (default: fractions of the capacity)")
    parser.add_argument("--fractions", default=",".join(map(str, DEFAULT_FRACTIONS)))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results/load"))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)

    def work() -> None:
        cfg = SimConfig(trace=args.trace, policy=args.policy, budget=args.budget, hardware=args.hardware,
                        max_batch=args.max_batch, max_requests=args.max_requests, seed=args.seed)
        prepare(cfg)
        if args.rates:
            rates = [float(r) for r in args.rates.split(",")]
        else:
            capacity = capacity_rps(cfg)
            print(f"capacity with {args.max_batch} requests batched: {capacity:.4g} requests/s")
            rates = [capacity * float(f) for f in args.fractions.split(",")]
        curve = load_curve(cfg, rates)
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_csv(args.out / "load_curve.csv", curve)
        atomic_write_text(args.out / "load_curve.md", curve.to_markdown(index=False, floatfmt=".4g") + "\n")
        plot(curve, f"{args.policy} {args.budget} on {args.hardware}, max batch {args.max_batch}", args.out)
        print(curve.to_markdown(index=False, floatfmt=".4g"))
        print(f"written: {args.out}/load_curve.(csv|md|png|svg)")

    run_cli(work)


if __name__ == "__main__":
    main()
