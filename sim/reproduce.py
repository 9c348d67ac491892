"""Reproduce the FineMoE paper's comparison on our traces: every policy, every shipped trace, a budget sweep.

    python -m sim.reproduce [--out results/reproduce] [--hardware rtx3090] [--budgets 2GB,4GB,...]
                            [--traces NAME,...] [--train-requests 32] [--replay-requests 8] [--jobs 2] [--quick]

Writes into one folder: runs.csv (one row per trace, policy and budget), reproduction.md (hit rate
and TPOT per policy and budget, ProMoE's predictor precision and recall, MoEpic's split ratios, and
FineMoE against the best of the paper's baselines at 6 GB beside the paper's claims, with why ours
differ), and per trace TRACE_hit_rate.png and TRACE_tpot.png (each against the budget, per policy).

Budgets are the paper's sizes (GB of expert memory) for the real model of the trace's routing shape;
a trace of small stand-in experts gets the same fraction of all its expert bytes. Every policy of
a trace replays the same requests; the leading ones train (ProMoE's predictor, MoEpic's
configuration) and fill FineMoE's and MoE-Infinity's stores.
"""
from __future__ import annotations

import argparse
import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from tqdm import tqdm  # noqa: E402

from policies import available, policy_class  # noqa: E402
from sim.api import prepare, resolve_hardware, simulate, split_requests  # noqa: E402
from sim.budget import format_bytes, parse_budget  # noqa: E402
from sim.config import SimConfig  # noqa: E402
from sim.report import atomic_save_figure, atomic_write_csv, atomic_write_text  # noqa: E402
from traces import Trace, load_trace  # noqa: E402
from traces.cli import run_cli  # noqa: E402
from traces.defaults import resolve_trace, shipped_traces  # noqa: E402
from traces.errors import UserError  # noqa: E402
from traces.stats import trace_reuse  # noqa: E402
from traces.model_spec import ModelSpec, known_models, load_model_spec  # noqa: E402

BUDGETS = ("2GB", "4GB", "6GB", "8GB", "12GB", "24GB")
QUICK_BUDGETS = ("6GB",)
HEADLINE_BUDGET = "6GB"
# The systems FineMoE is compared with in the paper; MoEpic came later and is shown, not compared.
PAPER_BASELINES = ("moe_infinity", "promoe", "mixtral_offload", "deepspeed")
BOUNDS = ("all_resident", "belady", "oracle_prefetch")
# ../shared/docs/policies.md: FineMoE against the best baseline
PAPER_CLAIMS = {"latency_reduction": 0.47, "hit_rate_gain": 0.36, "tpot_reduction": 0.32}
DIFFERENCE_TOLERANCE = 0.10  # a claim is matched when ours lies within 10 points of it


@dataclass(frozen=True)
class Run:
    trace: str
    policy: str
    budget_label: str
    budget_bytes: int
    fraction: float
    cfg: SimConfig


def reference_model(model: ModelSpec) -> ModelSpec:
    """The real model profile of the trace's routing shape (the trace's own when none matches)."""
    for name in known_models():
        spec = load_model_spec(name)
        if spec.same_routing_shape(model):
            return spec
    return model


def budget_bytes(label: str, trace_model: ModelSpec) -> tuple[int, float]:
    """(bytes for this trace, fraction of all expert bytes) of a paper budget such as '6GB'."""
    reference = reference_model(trace_model)
    fraction = parse_budget(label, reference.bytes_per_expert) / reference.total_expert_bytes
    return int(fraction * trace_model.total_expert_bytes), fraction


def plan_runs(traces: list[Trace], policies: list[str], budgets: list[str], hardware: str, budget_scope: str,
              train_requests: int, replay_requests: int, seed: int) -> list[Run]:
    runs = []
    for trace in traces:
        n = trace.num_requests
        train = min(train_requests, n // 2)
        fraction_train = (train + 1e-6) / n if train else 0.0
        for label in budgets:
            nbytes, fraction = budget_bytes(label, trace.model)
            if nbytes < trace.model.bytes_per_expert:
                continue  # below one expert of this trace's model
            for policy in policies:
                cfg = SimConfig(trace=str(trace.path), policy=policy, budget=f"{nbytes}B", hardware=hardware,
                                budget_scope=budget_scope, train_fraction=fraction_train, max_requests=replay_requests,
                                seed=seed)
                runs.append(Run(trace.path.name, policy, label, nbytes, fraction, cfg))
    return runs


def execute(run: Run) -> dict[str, Any]:
    m = simulate(run.cfg).metrics
    info = m.policy_info
    theta = info.get("theta_per_layer")
    return {
        "trace": run.trace, "policy": run.policy, "budget": run.budget_label, "budget_bytes": run.budget_bytes,
        "budget_fraction": run.fraction, "budget_experts": m.budget_experts, "requests": m.requests,
        "hit_rate": m.hit_rate, "prefetch_hit_rate": m.prefetch_hit_rate, "late_prefetch_rate": m.late_prefetch_rate,
        "ttft_mean_s": m.ttft_mean_s, "tpot_mean_s": m.tpot_mean_s, "tpot_p99_s": m.tpot_p99_s,
        "e2e_mean_s": m.e2e_mean_s, "bytes_h2d": m.bytes_h2d, "wasted_prefetch_bytes": m.wasted_prefetch_bytes,
        "stall_s": m.stall_s, "gpu_mem_high_water_bytes": m.gpu_mem_high_water_bytes,
        "predictor_precision": info.get("predictor_precision", math.nan),
        "predictor_recall": info.get("predictor_recall", math.nan),
        "theta_per_layer": "" if theta is None else " ".join(f"{t:g}" for t in theta),
    }


def run_all(runs: list[Run], jobs: int) -> pd.DataFrame:
    rows = []
    with tqdm(total=len(runs), desc="runs", unit="run") as bar:
        if jobs <= 1:
            for run in runs:
                rows.append(execute(run))
                bar.update()
        else:
            with ProcessPoolExecutor(max_workers=jobs) as pool:
                for row in pool.map(execute, runs):
                    rows.append(row)
                    bar.update()
    frame = pd.DataFrame(rows)
    frame["policy"] = pd.Categorical(frame["policy"], categories=list(dict.fromkeys(r.policy for r in runs)))
    return frame.sort_values(["trace", "budget_bytes", "policy"], kind="stable").reset_index(drop=True)


# --- the comparison with the paper ---
def facts(trace: Trace, hardware: str) -> dict[str, Any]:
    """What about a trace and a link decides how much prediction can buy."""
    model = trace.model
    hw = resolve_hardware(hardware)
    layer_s = hw.non_expert_time(model, 1) + model.top_k * hw.expert_time(model, 1)
    sample = trace.probs(slice(0, min(trace.num_iterations, 256)), unknown=0.0)  # recorded non-zeros only
    return {
        "requests": trace.num_requests,
        "prefill": "per token" if trace.prefill_iters.sum() else "as counts only" if trace.prefill_counts.any() else "none",
        "embeddings": bool(trace.embedding_names),
        "topk_only": bool((np.count_nonzero(sample, axis=-1) <= model.top_k).all()),
        "lookahead": trace.lookahead is not None,
        "copy_over_layer": hw.host_link.copy_time(model.bytes_per_expert) / layer_s,
        "layer_bytes": model.num_experts * model.bytes_per_expert * reference_model(model).total_expert_bytes
        / model.total_expert_bytes,  # in the paper's units, like the budgets
        "reuse": trace_reuse(trace),
        "next_layer_recall": trace.meta.realism.get("next_layer_recall"),
        "source": trace.source.label(),
    }


def why(metric: str, f: dict[str, Any], fine: pd.Series, best: pd.Series) -> str:
    """One sentence on why our figure departs from the paper's, from the trace's and link's facts and
    the runs' late prefetches."""
    data = []
    if not f["embeddings"]:
        data.append("no prompt embeddings (no semantic search)")
    if f["topk_only"]:
        data.append("only top-k router probabilities (FineMoE's maps, and its p x freq eviction, see 0 for the other experts)")
    if f["prefill"] != "per token":
        data.append("no per-token prefill iterations" if f["prefill"] == "none" else "prefills known only as counts")
    if f["requests"] < 20:
        data.append(f"{f['requests']} requests (a nearly empty map store)")
    if f["next_layer_recall"] is not None:
        data.append(f"routing of which the layer before predicts {f['next_layer_recall']:.0%} (next-layer recall)")
    tail = f"; and the trace has {', '.join(data)}" if data else ""
    def outcome(row: pd.Series) -> str:
        late = row["late_prefetch_rate"]
        return f"{late:.0%} late, {1 - row['hit_rate'] - late:.0%} missed"

    if metric == "hit_rate_gain":
        return (f"A hit needs its copy landed before the router, and a copy takes {f['copy_over_layer']:.0f}x a "
                f"layer's compute here: FineMoE's expert uses were {outcome(fine)}, {best['policy']}'s "
                f"{outcome(best)}{tail}.")
    return (f"A copy takes {f['copy_over_layer']:.0f}x a layer's compute here, so late and wrong prefetches "
            f"delay the demand copies queued behind them (FineMoE's expert uses: {outcome(fine)}){tail}.")


def comparison(frame: pd.DataFrame, trace: str) -> pd.DataFrame | None:
    at = frame[(frame["trace"] == trace) & (frame["budget"] == HEADLINE_BUDGET)].set_index("policy", drop=False)
    baselines = at[at["policy"].isin(PAPER_BASELINES)]
    if "finemoe" not in at.index or baselines.empty:
        return None
    fine = at.loc["finemoe"]
    rows = []
    for metric, column, better_low in (("latency_reduction", "e2e_mean_s", True), ("hit_rate_gain", "hit_rate", False),
                                       ("tpot_reduction", "tpot_mean_s", True)):
        best = baselines.loc[baselines[column].idxmin() if better_low else baselines[column].idxmax()]
        ours = (best[column] - fine[column]) / best[column] if better_low else \
            (fine[column] - best[column]) / best[column] if best[column] else math.nan
        rows.append({"metric": metric, "column": column, "best_baseline": best["policy"],
                     "baseline_value": best[column], "finemoe_value": fine[column], "ours": ours,
                     "paper": PAPER_CLAIMS[metric], "finemoe": fine, "best": best})
    return pd.DataFrame(rows)


# --- reports ---
def percent(x: float) -> str:
    return "-" if x != x else f"{x:.1%}"


def pivot(frame: pd.DataFrame, column: str, fmt) -> str:
    table = frame.pivot_table(index="policy", columns="budget", values=column, sort=False, observed=True)
    budgets = list(dict.fromkeys(frame.sort_values("budget_bytes")["budget"]))
    table = table[budgets].map(fmt)
    return table.to_markdown()


def markdown(frame: pd.DataFrame, trace_facts: dict[str, dict[str, Any]], hardware: str, split: dict[str, str]) -> str:
    claims = {"latency_reduction": "lower inference latency", "hit_rate_gain": "higher expert hit rate",
              "tpot_reduction": "lower TPOT"}
    lines = ["# FineMoE's comparison, reproduced on our traces", "",
             f"Hardware profile `{hardware}`; budgets are GB of expert memory for the real model of each trace's "
             "routing shape (the same fraction of all expert bytes for stand-in experts). Hit rate: expert uses "
             "found resident when the router has run; a prefetch still in flight is a late prefetch, not a hit. "
             "TPOT: mean time between output tokens. Generated by `python -m sim.reproduce`.", ""]
    for trace, part in frame.groupby("trace", sort=False):
        f = trace_facts[trace]
        lines += [f"## {trace}", "",
                  f"Routing: {f['source']}. {f['requests']} requests ({split[trace]}); token-to-token expert reuse "
                  f"{percent(f['reuse'])} (real Mixtral decode: 37.5%); prefill routing {f['prefill']}; "
                  f"prompt embeddings {'yes' if f['embeddings'] else 'no'}; full router probabilities "
                  f"{'no (top-k only)' if f['topk_only'] else 'yes'}; lookahead gates "
                  f"{'yes' if f['lookahead'] else 'no'}. One expert copy = {f['copy_over_layer']:.1f}x a decode "
                  "layer's compute.", "",
                  "### Expert hit rate", "", pivot(part, "hit_rate", percent), "",
                  "### TPOT (ms)", "", pivot(part, "tpot_mean_s", lambda x: f"{x * 1e3:.1f}"), ""]
        if "deepspeed" in set(part["policy"]):
            lines += [f"DeepSpeed gathers whole layers and keeps two resident: it needs {f['layer_bytes'] * 2 / 1e9:.1f} GB "
                      "here; below one layer's experts it gathers only what the router picked.", ""]
        promoe = part[part["policy"] == "promoe"]
        if not promoe.empty:
            row = promoe.iloc[0]
            lines += [f"ProMoE's predictor on the held-out (replayed) requests: precision "
                      f"{percent(row['predictor_precision'])}, recall {percent(row['predictor_recall'])}.", ""]
        moepic = part[part["policy"] == "moepic"]
        if not moepic.empty:
            lines += ["MoEpic's split ratio theta per layer:", ""]
            lines += [f"- {r['budget']}: {r['theta_per_layer']}" for _, r in moepic.iterrows()]
            lines += [""]
        table = comparison(frame, trace)
        if table is None:
            continue
        lines += [f"### FineMoE against the best baseline at {HEADLINE_BUDGET}", "",
                  "Baselines: the paper's (MoE-Infinity, ProMoE, Mixtral-Offloading, DeepSpeed), the best for "
                  "each metric. The paper's 47% and 36% are averages over its settings; 32% is at 6 GB.", "",
                  "| metric | best baseline | baseline | FineMoE | ours | paper |", "|---|---|---|---|---|---|"]
        notes = []
        units = {"e2e_mean_s": lambda x: f"{x:.2f} s", "tpot_mean_s": lambda x: f"{x * 1e3:.1f} ms", "hit_rate": percent}
        for _, r in table.iterrows():
            value = units[r["column"]]
            lines.append(f"| {claims[r['metric']]} | {r['best_baseline']} | {value(r['baseline_value'])} | "
                         f"{value(r['finemoe_value'])} | {percent(r['ours'])} | {percent(r['paper'])} |")
            if not abs(r["ours"] - r["paper"]) <= DIFFERENCE_TOLERANCE:
                notes.append(f"- {claims[r['metric']]}: {why(r['metric'], trace_facts[trace], r['finemoe'], r['best'])}")
        lines += [""] + (["Where ours differ:", ""] + notes if notes else ["All three within 10 points of the paper."]) + [""]
    return "\n".join(lines)


def plot(frame: pd.DataFrame, trace: str, column: str, ylabel: str, out: Path) -> None:
    part = frame[frame["trace"] == trace]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for policy, rows in part.groupby("policy", sort=False, observed=True):
        rows = rows.sort_values("budget_bytes")
        style = "--" if policy in BOUNDS else "-"
        ax.plot(rows["budget_bytes"] / 1e9, rows[column] * (1e3 if column.endswith("_s") else 1), style, marker="o",
                label=policy, linewidth=2.5 if policy == "finemoe" else 1.2)
    ax.set(xlabel="expert memory budget (GB)", ylabel=ylabel, title=f"{trace}: {ylabel} against budget", xscale="log")
    budgets_gb = sorted({b / 1e9 for p, b in zip(part["policy"], part["budget_bytes"]) if not policy_class(p).ignores_budget})
    ax.set_xticks(budgets_gb, [f"{b:g}" for b in budgets_gb])
    ax.minorticks_off()
    if column.endswith("_s"):
        ax.set_yscale("log")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    atomic_save_figure(fig, out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sim.reproduce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("results/reproduce"))
    parser.add_argument("--hardware", default="rtx3090", help="the paper's GPU by default (one PCIe 4.0 link); "
                        "rtx3090x6 is its whole testbed")
    parser.add_argument("--budget-scope", default="per_gpu", choices=("per_gpu", "total"),
                        help="with several GPUs: each GPU's budget, or the total split evenly")
    parser.add_argument("--budgets", default=",".join(BUDGETS), help="paper sizes, comma-separated (include 6GB)")
    parser.add_argument("--traces", help="comma-separated shipped trace names or trace directories (default: all shipped)")
    parser.add_argument("--policies", help="comma-separated (default: every registered policy)")
    parser.add_argument("--train-requests", type=int, default=32, help="leading requests that train (at most half)")
    parser.add_argument("--replay-requests", type=int, default=6, help="requests replayed after them")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (processes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help=f"only {HEADLINE_BUDGET}, 2 replayed requests")
    args = parser.parse_args(argv)

    def work() -> None:
        names = args.traces.split(",") if args.traces else shipped_traces()
        if not names:
            raise UserError("no shipped trace found; pass --traces PATH")
        traces = [load_trace(resolve_trace(name)) for name in names]
        policies = args.policies.split(",") if args.policies else [p for p in available() if not p.startswith("test_")]
        budgets = list(QUICK_BUDGETS) if args.quick else args.budgets.split(",")
        if HEADLINE_BUDGET not in budgets:
            raise UserError(f"--budgets must include {HEADLINE_BUDGET}, where the paper's TPOT claim is made")
        for label in budgets:
            budget_bytes(label, traces[0].model)  # one clear error for a malformed size
        replay = 2 if args.quick else args.replay_requests
        runs = plan_runs(traces, policies, budgets, args.hardware, args.budget_scope, args.train_requests, replay,
                         args.seed)
        for run in {r.cfg.policy: r for r in runs}.values():
            prepare(run.cfg)  # one clear error for a bad policy, hardware or trace, before any run
        frame = run_all(runs, args.jobs)
        args.out.mkdir(parents=True, exist_ok=True)
        trace_facts = {t.path.name: facts(t, args.hardware) for t in traces}
        split = {}
        for t in traces:
            first = next(r for r in runs if r.trace == t.path.name)
            train, replayed = split_requests(t.num_requests, first.cfg.train_fraction, first.cfg.max_requests)
            split[t.path.name] = f"{len(train)} train, {len(replayed)} replayed"
        atomic_write_csv(args.out / "runs.csv", frame)
        setup = args.hardware if resolve_hardware(args.hardware).num_gpus == 1 else \
            f"{args.hardware}, budgets {args.budget_scope.replace('_', ' ')}"
        atomic_write_text(args.out / "reproduction.md", markdown(frame, trace_facts, setup, split))
        for t in trace_facts:
            plot(frame, t, "hit_rate", "expert hit rate", args.out / f"{t}_hit_rate.png")
            plot(frame, t, "tpot_mean_s", "TPOT (ms)", args.out / f"{t}_tpot.png")
        print(f"{len(frame)} runs; budgets {', '.join(format_bytes(b) for b in sorted(set(frame['budget_bytes'])))}")
        print(f"written: {args.out}/runs.csv, reproduction.md, *_hit_rate.png, *_tpot.png")

    run_cli(work)


if __name__ == "__main__":
    main()
