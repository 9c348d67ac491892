"""Where copying and caching experts stops paying: sweep the decode batch and the prompt length,
and show which strategy wins where (python -m sim.breakeven).

Strategies: copy-and-cache (lru), CPU compute for what is not cached (fiddler, lru_cpu), llama.cpp's
static split (n_cpu_moe, layers=fit), KTransformers' frequency placement, and all_resident where
the model's experts fit the GPU. Decode: TPOT mean at each batch size (closed loop, as many
clients as the batch). Prompt: TTFT mean at each prompt length.

Real routing, reshaped (and labelled so wherever results appear): a trace's requests are cut into
segments of --segment decode tokens, each served as a request, so that batches of real routing
can be formed from few long requests. The prompt's routing is not recorded in the shipped traces:
a prefill of P tokens is charged from a model of prefill routing, each layer's experts serving
P x top_k tokens in the proportions the trace's decode tokens chose them ("modelled prefill").
Outputs: breakeven.csv (units in column names), breakeven.md (tables, winners, crossovers),
breakeven.png.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from sim.api import resolve_hardware, simulate  # noqa: E402
from sim.budget import parse_budget  # noqa: E402
from sim.config import SimConfig  # noqa: E402
from sim.report import atomic_save_figure, atomic_write_csv, atomic_write_text  # noqa: E402
from traces import Provenance, Trace, TraceWriter, load_trace  # noqa: E402
from traces.cli import ArgumentParser, run_cli  # noqa: E402
from traces.defaults import resolve_trace  # noqa: E402
from traces.errors import UserError  # noqa: E402
from traces.format import tally_experts  # noqa: E402
from traces.model_spec import load_model_spec  # noqa: E402

STRATEGIES = {  # label -> (policy, parameters)
    "lru (copy and cache)": ("lru", {}),
    "fiddler (CPU when faster)": ("fiddler", {}),
    "lru_cpu (cache + CPU misses)": ("lru_cpu", {}),
    "n_cpu_moe (fit)": ("n_cpu_moe", {"layers": "fit"}),
    "ktransformers (frequency)": ("ktransformers", {"strategy": "frequency"}),
    "all_resident": ("all_resident", {}),
}


def segmented(trace: Trace, segment: int, prompt: int, out: Path) -> Trace:
    """The trace's decode routing cut into requests of `segment` tokens, each with a modelled
    prefill of `prompt` tokens (0: none)."""
    model = trace.model
    share = tally_experts(trace.experts, model.num_experts).astype(np.float64)
    share /= share.sum(axis=1, keepdims=True)
    counts = np.round(share * prompt * model.top_k).astype(np.uint32)
    dataset = f"{trace.source.dataset}, real decode routing cut into {segment}-token requests" + \
        (f", modelled prefill of {prompt} tokens" if prompt else "")
    writer = TraceWriter(out, model, Provenance(trace.source.model, trace.source.weights_origin, dataset,
                                                "sim.breakeven"), overwrite=True,
                         topm=trace.meta.topm if trace.probs_known == "topm" else None)
    n = 0
    for r in range(trace.num_requests):
        offset, prefill, decode = trace.rows(r)
        for start in range(offset + prefill, offset + prefill + decode - segment + 1, segment):
            rows = slice(start, start + segment)
            writer.add_request(request_id=f"s{n}", dataset=trace.source.dataset, probs=trace.probs(rows),
                               experts=trace.experts[rows], prompt_tokens=prompt,
                               prefill_counts=counts if prompt else None)
            n += 1
    return load_trace(writer.close())


def strategies_for(model, hardware) -> dict[str, tuple[str, dict]]:
    fits = model.total_expert_bytes <= 0.9 * hardware.gpu_memory_bytes  # room left for the rest of the model
    return {k: v for k, v in STRATEGIES.items() if k != "all_resident" or fits}


def run_point(trace: Trace, policy: str, params: dict, budget: str, hardware, batch: int, requests: int,
              host_budget: str | None) -> dict:
    cfg = SimConfig(trace=str(trace.path), policy=policy, policy_params=params, budget=budget, hardware=hardware,
                    max_batch=batch, clients=batch, train_fraction=0.25, max_requests=requests,
                    host_budget=host_budget, seed=0)
    m = simulate(cfg, trace=trace).metrics
    return {"tpot_mean_ms": m.tpot_mean_s * 1e3, "ttft_mean_ms": m.ttft_mean_s * 1e3, "hit_rate": m.hit_rate,
            "cpu_rate": m.cpu_rate, "h2d_GB": m.bytes_h2d * 1e-9, "throughput_tok_per_s": m.throughput_tokens_per_s}


def crossovers(frame: pd.DataFrame, axis: str, metric: str) -> list[str]:
    """Where the winner changes along the axis."""
    best = frame.loc[frame.groupby(axis)[metric].idxmin()].sort_values(axis)
    notes, prev = [], None
    for _, row in best.iterrows():
        if prev is not None and row["strategy"] != prev["strategy"]:
            notes.append(f"between {axis} {prev[axis]:g} and {row[axis]:g}: {prev['strategy']} -> {row['strategy']}")
        prev = row
    return notes


def markdown(frame: pd.DataFrame, header: str) -> str:
    lines = [f"# Break-even: {header}", ""]
    for axis, metric, what in (("batch", "tpot_mean_ms", "decode TPOT, mean (ms)"),
                               ("prompt_tokens", "ttft_mean_ms", "TTFT, mean (ms)")):
        part = frame[frame["sweep"] == axis]
        if part.empty:
            continue
        table = part.pivot(index=axis, columns="strategy", values=metric)
        offloaded = [c for c in table.columns if c != "all_resident"]
        table["winner"] = table.idxmin(axis=1)
        table["best offloaded"] = table[offloaded].idxmin(axis=1)
        lines += [f"## {what} by {axis}", "", table.to_markdown(floatfmt=".2f"), ""]
        for title, rows in (("Crossovers", part), ("Crossovers among the offloading strategies (all_resident left out)",
                                                    part[part["strategy"] != "all_resident"])):
            notes = crossovers(rows, axis, metric)
            lines += [f"{title}:", ""] + ([f"- {n}" for n in notes] or ["- none: one strategy wins throughout"]) + [""]
    return "\n".join(lines)


def plot(frame: pd.DataFrame, header: str) -> Figure:
    fig = Figure(figsize=(11, 4.2))
    for ax, (axis, metric, label) in zip(fig.subplots(1, 2), (("batch", "tpot_mean_ms", "TPOT, mean (ms)"),
                                                               ("prompt_tokens", "ttft_mean_ms", "TTFT, mean (ms)"))):
        part = frame[frame["sweep"] == axis]
        for name, rows in part.groupby("strategy"):
            rows = rows.sort_values(axis)
            ax.plot(rows[axis], rows[metric], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("decode batch (requests)" if axis == "batch" else "prompt length (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    fig.axes[0].legend(fontsize=7)
    fig.suptitle(header, fontsize=8)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m sim.breakeven", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", default="mixtral-8x7b-gsm8k", help="shipped trace name or trace directory")
    parser.add_argument("--model", help="model profile of the trace's shape (default: the trace's)")
    parser.add_argument("--hardware", default="h200-measured")
    parser.add_argument("--budget", default="32experts", help="GPU expert budget (stored format's bytes)")
    parser.add_argument("--host-budget", help="host RAM for experts over the profile's disk (default: all in RAM)")
    parser.add_argument("--batches", default="1,2,4,8,16")
    parser.add_argument("--prompts", default="16,64,256,1024")
    parser.add_argument("--segment", type=int, default=8, help="decode tokens per request cut from the trace")
    parser.add_argument("--requests", type=int, default=16, help="requests replayed per point")
    parser.add_argument("--link-GBps", type=float, help="override the host link's bandwidth (e.g. 25 for PCIe 4)")
    parser.add_argument("--out", type=Path, default=Path("results/breakeven"))
    args = parser.parse_args(argv)

    def work() -> None:
        try:
            batches = [int(b) for b in args.batches.split(",")]
            prompts = [int(p) for p in args.prompts.split(",")]
        except ValueError:
            raise UserError("--batches and --prompts take comma-separated whole numbers, e.g. 1,4,16") from None
        if args.segment < 1 or min(batches + prompts) < 1:
            raise UserError("--segment, --batches and --prompts must be at least 1")
        source = load_trace(resolve_trace(args.trace))
        hardware = resolve_hardware(args.hardware).to_dict()
        if args.link_GBps:
            hardware["host_link"] = {"latency_s": hardware["host_link"]["latency_s"], "bandwidth_Bps": args.link_GBps * 1e9}
            hardware["name"] = f"{hardware['name']}-link{args.link_GBps:g}GBps"
        model = load_model_spec(args.model) if args.model else source.model
        parse_budget(args.budget, model.bytes_per_expert)  # one clear error for a malformed size
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            decode = segmented(source, args.segment, 0, Path(tmp) / "decode")
            if decode.num_requests < 2:
                raise UserError(f"--segment {args.segment} leaves {decode.num_requests} request(s); use a shorter one")
            label = decode.source.label()
            chosen = strategies_for(model, resolve_hardware(hardware))
            for name, (policy, params) in chosen.items():
                for b in batches:
                    point = run_point(decode, policy, params, args.budget, hardware, b, args.requests, args.host_budget)
                    rows.append({"sweep": "batch", "strategy": name, "batch": b, "prompt_tokens": 0, **point})
            for p in prompts:
                prefilled = segmented(source, args.segment, p, Path(tmp) / f"p{p}")
                for name, (policy, params) in chosen.items():
                    point = run_point(prefilled, policy, params, args.budget, hardware, 1, args.requests,
                                      args.host_budget)
                    rows.append({"sweep": "prompt_tokens", "strategy": name, "batch": 1, "prompt_tokens": p, **point})
        frame = pd.DataFrame(rows)
        frame.insert(0, "trace", label)
        frame.insert(1, "hardware", hardware["name"])
        frame.insert(2, "budget", args.budget)
        header = f"{model.name} on {hardware['name']}, GPU budget {args.budget}; routing: {label}"
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_csv(args.out / "breakeven.csv", frame)
        atomic_write_text(args.out / "breakeven.md", markdown(frame, header))
        atomic_save_figure(plot(frame, header), args.out / "breakeven.png")
        print(markdown(frame, header))

    run_cli(work)


if __name__ == "__main__":
    main()
