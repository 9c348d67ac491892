"""How close is traces.synth to the real routing it was fitted on? Fitted-vs-real and cross-validation.

    python -m traces.synth_check [TRACE] [--repeats 20] [--out DIR]

fitted vs real: fit to every request of TRACE (default: the shipped real Mixtral trace), generate
`repeats` traces with the same request lengths, and compare their mean realism figures (token
reuse; per-layer LRU and Belady hit rates at 1/4, 1/2, 3/4 of the experts) with the trace's.
cross-validation: for each request, fit to the others only, generate `repeats` traces of one
request of its length, and compare with that request alone. Relative errors are (synthetic - real)
/ real; the acceptance bound of the generator is 10%.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from traces.atomic import atomic_write_csv
from traces.cli import ArgumentParser, console as cli_console, run_cli
from traces.defaults import resolve_trace
from traces.errors import UserError
from traces.format import Trace, TraceWriter, load_trace
from traces.stats import realism_figures
from traces.synth import FittedSource, SynthOptions, fit_source, synthesize
from traces.workloads import Workload

DEFAULT_SOURCE = "mixtral-8x7b-gsm8k"


def headline(figures: dict) -> dict[str, float]:
    """The figures the distance to real routing is made of, flat: reuse, lru@s, belady@s."""
    row = {"token_reuse": figures["token_reuse"]}
    for key, name in (("lru_hit_rate", "lru"), ("belady_hit_rate", "belady")):
        row.update({f"{name}_{s}_slots": value for s, value in figures[key].items()})
    return row


def subset_trace(trace: Trace, requests: list[int], out_dir: Path) -> Trace:
    """A trace of some of another trace's requests (routing, lengths and embeddings copied)."""
    writer = TraceWriter(out_dir, trace.model, trace.source, topm=trace.meta.topm or None, overwrite=True)
    for r in requests:
        offset, prefill, decode = trace.rows(r)
        rows = slice(offset, offset + prefill + decode)
        row = trace.requests.iloc[r]
        writer.add_request(request_id=str(row["request_id"]), dataset=str(row["dataset"]), probs=trace.probs(rows),
                           experts=np.asarray(trace.experts[rows]), prefill_iters=prefill,
                           prompt_tokens=int(row["prompt_tokens"]), output_tokens=int(row["output_tokens"]),
                           prefill_counts=np.asarray(trace.prefill_counts[r]))
    return load_trace(writer.close())


def _lengths_of(trace: Trace, requests: list[int]) -> Workload:
    frame = trace.requests.iloc[requests]
    return Workload("lengths", f"the request lengths of {trace.path.name}", frame["prompt_tokens"].to_numpy(np.int64),
                    frame["output_tokens"].to_numpy(np.int64), None, None)


def _generated_figures(source: FittedSource, workload: Workload, repeats: int, seed: int, scratch: Path) -> pd.DataFrame:
    rows = []
    for repeat in range(repeats):
        options = SynthOptions(requests=len(workload), prefill="rows", seed=seed + repeat, topic_share=0.0)
        out = synthesize(source, scratch / f"synthetic-{repeat}", options, overwrite=True, progress=False,
                         workload=workload)
        rows.append(headline(load_trace(out).meta.realism))
    return pd.DataFrame(rows)


def _compare(label: str, real: dict[str, float], generated: pd.DataFrame) -> pd.DataFrame:
    mean = generated.mean()
    return pd.DataFrame({
        "check": label, "figure": list(real), "real": list(real.values()),
        "synthetic_mean": [mean[k] for k in real], "synthetic_sd": [generated[k].std(ddof=1) for k in real],
        "relative_error": [(mean[k] - v) / v for k, v in real.items()],
    })


def check(trace: Trace, repeats: int = 20, seed: int = 0) -> pd.DataFrame:
    """Fitted-vs-real and leave-one-request-out cross-validation rows (see the module doc)."""
    if trace.num_requests < 2:
        raise UserError(f"{trace.path}: cross-validation needs at least two requests, the trace has one")
    everyone = list(range(trace.num_requests))
    frames = []
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        fitted = fit_source(trace, seed)
        frames.append(_compare(f"fit on all {trace.num_requests} requests, compare with all",
                               headline(realism_figures(trace)),
                               _generated_figures(fitted, _lengths_of(trace, everyone), repeats, seed, scratch)))
        for held_out in everyone:
            others = [r for r in everyone if r != held_out]
            source = fit_source(trace, seed, requests=others)
            alone = subset_trace(trace, [held_out], scratch / f"request-{held_out}")
            frames.append(_compare(f"fit on requests {others}, compare with request {held_out}",
                                   headline(realism_figures(alone)),
                                   _generated_figures(source, _lengths_of(trace, [held_out]), repeats, seed, scratch)))
    return pd.concat(frames, ignore_index=True)


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments (the README's command lines are checked against it)."""
    parser = ArgumentParser(prog="python -m traces.synth_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace", nargs="?", default=DEFAULT_SOURCE)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("synth_check"))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)

    def work() -> None:
        from rich.table import Table

        if args.repeats < 2:
            raise UserError("--repeats must be at least 2")
        table = check(load_trace(resolve_trace(args.trace)), args.repeats, args.seed)
        console = cli_console()
        for label, rows in table.groupby("check", sort=False):
            view = Table(title=label)
            for column in ("figure", "real", "synthetic (mean ± sd)", "relative error"):
                view.add_column(column, justify="left" if column == "figure" else "right")
            for row in rows.itertuples():
                view.add_row(row.figure, f"{row.real:.1%}", f"{row.synthetic_mean:.1%} ± {row.synthetic_sd:.1%}",
                             f"{row.relative_error:+.1%}")
            console.print(view)
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_csv(args.out / "synth_check.csv", table)
        worst = table["relative_error"].abs().max()
        console.print(f"largest relative error: {worst:.1%} (bound 10%); table: {args.out / 'synth_check.csv'}")

    run_cli(work)


if __name__ == "__main__":
    main()
