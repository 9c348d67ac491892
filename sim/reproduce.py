"""Reproduce the FineMoE paper's comparison: every policy, on real routing, on the paper's testbed and one GPU.

    python -m sim.reproduce [--out results/reproduce] [--hardware rtx3090x6,rtx3090] [--budgets 2GB,6GB]
                            [--formats own,bf16] [--traces NAME,...] [--train-requests 32] [--replay-requests 6]
                            [--jobs 2] [--quick]

Writes into one folder: runs.csv (one row per trace, hardware, policy and budget), reproduction.md
(the main table on real routing only: hit rate and TPOT per policy and budget for each hardware
setup, FineMoE against the best of the paper's baselines at 6 GB beside the paper's claims, with a
measured reason for every difference, ours against all of them, and the ablation of ours; then the
synthetic and stand-in traces in a separate, labelled table at 6 GB on the last setup), and per
real trace and setup TRACE_HARDWARE_hit_rate.png and TRACE_HARDWARE_tpot.png.

Each setup runs with the experts stored in each of --formats: the trace model's own (gpt-oss: MXFP4)
and bf16, as the FineMoE artifact and the paper's systems store them.

Ours is tuned on the training split alone: for each real trace, setup and format, every point of
TUNING runs with the first half of the training requests training and the second half replayed;
the point of lowest mean TPOT there is ours in the main table (and the base of its ablation).

On a multi-GPU profile a budget is each GPU's (the FineMoE artifact's semantics; the report gives
the total beside it), and FineMoE runs with the artifact's placement (round_robin: experts dealt
out over all GPUs, sim.topology); the other policies with layers split in order.

Each run is kept in runs/TRACE/HARDWARE/POLICY-BUDGET[-VARIANT]/ as soon as it finishes, with its
config, the trace's content hash and the code's version; run again, the command skips the runs kept for the same
three and runs only the rest (a killed reproduction loses nothing).

Budgets are the paper's sizes (GB of expert memory) for the real model of the trace's routing shape;
a trace of small stand-in experts gets the same fraction of all its expert bytes. Every policy of
a trace replays the same requests; the leading ones train (ProMoE's predictor, MoEpic's
configuration) and fill FineMoE's and MoE-Infinity's stores.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from tqdm import tqdm  # noqa: E402

from policies import policy_class, shipped  # noqa: E402
from sim.api import prepare, resolve_hardware, simulate, split_requests  # noqa: E402
from sim.budget import format_bytes, parse_budget  # noqa: E402
from sim.config import SimConfig  # noqa: E402
from sim.provenance import PROVENANCE_FILE, git_commit, provenance, same_provenance  # noqa: E402
from sim.report import CONFIG_FILE, atomic_save_figure, atomic_write_csv, atomic_write_text, config_json  # noqa: E402
from traces import Trace  # noqa: E402
from traces.shared import shared_trace  # noqa: E402
from traces.cli import ArgumentParser, run_cli  # noqa: E402
from traces.defaults import resolve_trace, shipped_traces  # noqa: E402
from traces.errors import UserError  # noqa: E402
from traces.stats import trace_reuse  # noqa: E402
from traces.model_spec import ModelSpec, known_models, load_model_spec  # noqa: E402

BUDGETS = ("2GB", "6GB")
SETUPS = ("rtx3090x6", "rtx3090")  # the paper's testbed, then one of its GPUs
OURS = "reuse"
# Ours with one idea taken out at a time (policy knobs, policies/reuse.py), for the ablation table.
ABLATION = {
    "reuse": {},
    "reuse without timely prefetch": {"prefetch": "none"},
    "reuse without preload": {"preload": False},
    "reuse without prefetch and preload (eviction alone)": {"prefetch": "none", "preload": False},
    "global LRU eviction alone": {"eviction": "lru", "prefetch": "none", "preload": False},
    "reuse without the request's own count (training frequency alone)": {"prior_passes": math.inf},
}
# The knobs of ours swept on the training split (policies/reuse.py); the defaults are one point.
PLACED = "placed round_robin"  # on several GPUs every policy placed as FineMoE is: what placement alone is worth
TUNING = tuple({"decay": d, "prior_weight": w, "prior_passes": n, "min_q": q} for d in (0.5, 0.8)
               for w, n in ((0.5, math.inf), (0.8, 32.0)) for q in (0.3, 0.6))
FORMATS = ("own", "bf16")  # the trace model's own expert format, and the artifact's
QUICK_BUDGETS = ("6GB",)
HEADLINE_BUDGET = "6GB"
# The systems FineMoE is compared with in the paper; MoEpic came later and is shown, not compared.
PAPER_BASELINES = ("moe_infinity", "promoe", "mixtral_offload", "deepspeed")
BOUNDS = ("all_resident", "belady", "oracle_prefetch")
# ../shared/docs/policies.md: FineMoE against the best baseline
PAPER_CLAIMS = {"latency_reduction": 0.47, "hit_rate_gain": 0.36, "tpot_reduction": 0.32}
DIFFERENCE_TOLERANCE = 0.10  # a claim is matched when ours lies within 10 points of it
RUNS_DIR = "runs"  # one directory per run, written as it finishes: a restart skips those complete
ROW_FILE = "row.json"


@dataclass(frozen=True)
class Run:
    trace: str
    policy: str
    budget_label: str
    budget_bytes: int
    fraction: float
    cfg: SimConfig
    variant: str = ""  # an ablation variant of ours ("" for the policy as tuned)
    expert_format: str = ""  # how the experts are stored in this run (traces.expert_formats)


def routing_kind(trace: Trace) -> str:
    """real | synthetic | stand-in: what produced a trace's routing (only real routing enters the main table)."""
    origin = trace.source.weights_origin
    if origin.startswith("trained stand-in"):
        return "stand-in"
    if origin.startswith("none") or trace.source.tool.startswith("traces.synth"):
        return "synthetic"
    return "real"


def reference_model(model: ModelSpec) -> ModelSpec:
    """The real model profile of the trace's routing shape (the trace's own when none matches)."""
    for name in known_models():
        spec = load_model_spec(name)
        if spec.same_routing_shape(model):
            return spec
    return model


def budget_bytes(label: str, trace_model: ModelSpec) -> tuple[int, float]:
    """(bytes for this trace, fraction of all expert bytes) of a paper budget such as '6GB', the
    real model's experts stored as the trace model's are."""
    reference = reference_model(trace_model).with_format(trace_model.expert_format)
    fraction = parse_budget(label, reference.bytes_per_expert) / reference.total_expert_bytes
    return int(fraction * trace_model.total_expert_bytes), fraction


def formats_of(trace: Trace, formats: list[str]) -> list[str]:
    """The expert formats a trace runs in: 'own' is its model's (each once, in the order given)."""
    return list(dict.fromkeys(trace.model.expert_format if f == "own" else f for f in formats))


def split_of(trace: Trace, train_requests: int) -> tuple[int, float]:
    """(training requests, the train_fraction that gives them) for a trace."""
    train = min(train_requests, trace.num_requests // 2)
    return train, (train + 1e-6) / trace.num_requests if train else 0.0


def config(trace: Trace, policy: str, knobs: dict, nbytes: int, hardware: str, fmt: str, budget_scope: str,
           train_fraction: float, replay: int, seed: int, placement: str | None = None) -> SimConfig:
    multi = resolve_hardware(hardware).num_gpus > 1
    return SimConfig(trace=str(trace.path), policy=policy, policy_params=dict(knobs), budget=f"{nbytes}B",
                     hardware=hardware, budget_scope=budget_scope, train_fraction=train_fraction,
                     max_requests=replay, seed=seed, expert_format=None if fmt == trace.model.expert_format else fmt,
                     placement=placement or ("round_robin" if multi and policy == "finemoe" else "layers"))


def plan_tuning(traces: list[Trace], setups: list[str], formats: list[str], budget_scope: str, train_requests: int,
                replay_requests: int, seed: int) -> list[Run]:
    """Ours at every TUNING point, at the headline budget of each real trace, setup and format, on the
    training split alone: its first half trains, the next requests of it (at most replay_requests) are
    replayed (no tuning under 2 training requests)."""
    runs = []
    for trace in traces:
        train, _ = split_of(trace, train_requests)
        if routing_kind(trace) != "real" or train < 2:
            continue
        fit = train // 2
        for hardware in setups:
            for fmt in formats_of(trace, formats):
                nbytes, fraction = budget_bytes(HEADLINE_BUDGET, trace.model.with_format(fmt))
                for i, knobs in enumerate(TUNING):
                    cfg = config(trace, OURS, knobs, nbytes, hardware, fmt, budget_scope, (fit + 1e-6) / trace.num_requests,
                                 min(train - fit, replay_requests), seed)
                    runs.append(Run(trace.path.name, OURS, HEADLINE_BUDGET, nbytes, fraction, cfg, f"tuning{i}", fmt))
    return runs


def tuned_knobs(tuning: pd.DataFrame) -> dict[tuple[str, str, str], dict]:
    """The TUNING point of lowest mean TPOT on the training split, per trace, setup and format."""
    best = {}
    for (trace, hardware, fmt), part in tuning.groupby(["trace", "hardware", "expert_format"], sort=False):
        best[(trace, hardware, fmt)] = TUNING[int(part.loc[part["tpot_mean_s"].idxmin(), "variant"][len("tuning"):])]
    return best


def plan_runs(traces: list[Trace], policies: list[str], budgets: list[str], setups: list[str], budget_scope: str,
              train_requests: int, replay_requests: int, seed: int, ablation: bool = True,
              formats: list[str] = ("own",), tuned: dict[tuple[str, str, str], dict] | None = None) -> list[Run]:
    """Real traces: every setup, format and budget (and ours' ablation at the headline budget), ours
    with its tuned knobs; the others: the last setup in their own format at the headline budget only.
    A policy that computes on the host CPU runs only on a setup whose profile has the CPU (cpu_less)."""
    runs = []
    for trace in traces:
        real = routing_kind(trace) == "real"
        _, fraction_train = split_of(trace, train_requests)
        for hardware in setups if real else setups[-1:]:
            here = [p for p in policies if p not in cpu_less(policies, [hardware])]
            for fmt in formats_of(trace, formats) if real else [trace.model.expert_format]:
                best = (tuned or {}).get((trace.path.name, hardware, fmt), {})
                for label in budgets if real else [HEADLINE_BUDGET]:
                    nbytes, fraction = budget_bytes(label, trace.model.with_format(fmt))
                    if nbytes < trace.model.with_format(fmt).bytes_per_expert:
                        continue  # below one expert of this trace's model
                    variants = [(p, "", best if p == OURS else {}) for p in here]
                    if real and ablation and label == HEADLINE_BUDGET and OURS in here:
                        variants += [(OURS, name, {**best, **knobs}) for name, knobs in ABLATION.items() if knobs]
                    # How much FineMoE's placement alone is worth: every expert resident, placed as FineMoE is.
                    spread = real and label == HEADLINE_BUDGET and resolve_hardware(hardware).num_gpus > 1
                    # Every policy as FineMoE is placed, so that ours meets each like-for-like on the testbed too.
                    placed = [(p, PLACED, best if p == OURS else {}) for p in here if p != "finemoe"]
                    for policy, variant, knobs in variants + (placed if spread else []):
                        cfg = config(trace, policy, knobs, nbytes, hardware, fmt, budget_scope, fraction_train,
                                     replay_requests, seed, "round_robin" if variant == PLACED else None)
                        runs.append(Run(trace.path.name, policy, label, nbytes, fraction, cfg, variant, fmt))
    return runs


def cpu_less(policies: list[str], setups: list[str]) -> list[str]:
    """The policies that compute experts on the host CPU where some setup's profile has no CPU."""
    bare = [h for h in setups if resolve_hardware(h).cpu is None]
    return [p for p in policies if policy_class(p).uses_cpu and bare]


def execute(run: Run) -> dict[str, Any]:
    m = simulate(run.cfg).metrics
    info = m.policy_info
    theta = info.get("theta_per_layer")
    hw = resolve_hardware(run.cfg.hardware)
    expert_bytes = m.budget_bytes / m.budget_experts
    per_byte = hw.host_link.copy_time(expert_bytes) / expert_bytes  # at the profile's rate for one expert
    return {
        "trace": run.trace, "hardware": run.cfg.hardware, "expert_format": run.expert_format, "gpus": m.gpus,
        "placement": run.cfg.placement, "policy": run.policy, "variant": run.variant,
        "policy_params": json.dumps(dict(run.cfg.policy_params), sort_keys=True),
        "budget": run.budget_label, "budget_bytes": run.budget_bytes, "budget_total_bytes": run.budget_bytes * m.gpus,
        "budget_fraction": run.fraction, "budget_experts": m.budget_experts, "requests": m.requests,
        "hit_rate": m.hit_rate, "prefetch_hit_rate": m.prefetch_hit_rate, "late_prefetch_rate": m.late_prefetch_rate,
        "miss_rate": m.miss_rate,
        "ttft_mean_s": m.ttft_mean_s, "tpot_mean_s": m.tpot_mean_s, "tpot_p99_s": m.tpot_p99_s,
        "e2e_mean_s": m.e2e_mean_s, "bytes_h2d": m.bytes_h2d, "wasted_prefetch_bytes": m.wasted_prefetch_bytes,
        "stall_s": m.stall_s, "gpu_mem_high_water_bytes": m.gpu_mem_high_water_bytes,
        # the host links' share of the run spent copying (bytes at the profile's copy rate, over all links)
        "link_busy_fraction": m.bytes_h2d * per_byte / (m.gpus * m.makespan_s) if m.makespan_s > 0 else math.nan,
        "prefetch_accuracy": 1.0 - m.wasted_prefetch_bytes / m.prefetch_bytes_h2d if m.prefetch_bytes_h2d else math.nan,
        "predictor_precision": info.get("predictor_precision", math.nan),
        "predictor_recall": info.get("predictor_recall", math.nan),
        "map_accuracy": info.get("map_accuracy", math.nan),
        "theta_per_layer": "" if theta is None else " ".join(f"{t:g}" for t in theta),
    }


def run_dir(out: Path, run: Run) -> Path:
    name = f"{run.policy}-{run.budget_label}" + (f"-{run.variant}" if run.variant else "")
    return out / RUNS_DIR / run.trace / f"{run.cfg.hardware}-{run.expert_format}" / name


def stored_row(directory: Path, run: Run) -> dict[str, Any] | None:
    """The row of a run finished earlier with the same config, trace content and code version, else None."""
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
        made_by = json.loads((directory / PROVENANCE_FILE).read_text())
        row = json.loads((directory / ROW_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    same = config == json.loads(config_json(run.cfg.to_dict())) and same_provenance(made_by, provenance(run.cfg.trace))
    return row if same else None


def keep(directory: Path, run: Run, row: dict[str, Any]) -> None:
    """A finished run's row, written at once (the row last: it marks the run complete)."""
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / CONFIG_FILE, config_json(run.cfg.to_dict()))
    atomic_write_text(directory / PROVENANCE_FILE, json.dumps(provenance(run.cfg.trace), sort_keys=True))
    atomic_write_text(directory / ROW_FILE, json.dumps(row, sort_keys=True, default=lambda v: v.item()))


def run_all(runs: list[Run], jobs: int, out: Path) -> pd.DataFrame:
    """Every run's row; each run is kept under out/runs/ as it finishes, and one kept earlier (same
    config, trace and code) is not run again, so a killed reproduction restarted loses nothing."""
    rows: dict[int, dict[str, Any]] = {}
    todo = []
    for i, run in enumerate(runs):
        row = stored_row(run_dir(out, run), run)
        if row is None:
            todo.append(i)
        else:
            rows[i] = row
    if rows:
        print(f"{len(rows)} of {len(runs)} runs already complete in {out / RUNS_DIR}")
    with tqdm(total=len(todo), desc="runs", unit="run") as bar:
        def done(i: int, row: dict[str, Any]) -> None:
            keep(run_dir(out, runs[i]), runs[i], row)
            rows[i] = row
            bar.update()

        if jobs <= 1:
            for i in todo:
                done(i, execute(runs[i]))
        else:
            with ProcessPoolExecutor(max_workers=jobs) as pool:
                futures = {pool.submit(execute, runs[i]): i for i in todo}
                for future in as_completed(futures):
                    done(futures[future], future.result())
    frame = pd.DataFrame([rows[i] for i in range(len(runs))])
    frame["policy"] = pd.Categorical(frame["policy"], categories=list(dict.fromkeys(r.policy for r in runs)))
    return frame.sort_values(["trace", "budget_bytes", "policy"], kind="stable").reset_index(drop=True)


# --- the comparison with the paper ---
def facts(trace: Trace, hardware: str, fmt: str) -> dict[str, Any]:
    """What about a trace, its experts' format and a link decides how much prediction can buy."""
    model = trace.model.with_format(fmt)
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
        "expert_bytes": model.total_expert_bytes,
        "reuse": trace_reuse(trace),
        "next_layer_recall": trace.meta.realism.get("next_layer_recall"),
        "source": trace.source.label(),
    }


def measured(row: pd.Series) -> str:
    """A run's measured reasons: link busy, prefetch accuracy and waste, late and missed uses."""
    accuracy = "no prefetches" if row["prefetch_accuracy"] != row["prefetch_accuracy"] else \
        f"{row['prefetch_accuracy']:.0%} of prefetched bytes used ({row['wasted_prefetch_bytes'] / 1e9:.1f} GB wasted)"
    maps = "" if row.get("map_accuracy", math.nan) != row.get("map_accuracy", math.nan) else \
        f", map accuracy {row['map_accuracy']:.0%} (a layer's used experts among its prediction's top)"
    return (f"links busy {row['link_busy_fraction']:.0%}, {accuracy}, {row['late_prefetch_rate']:.1%} of uses late, "
            f"{row['miss_rate']:.1%} missed{maps}")


def why(f: dict[str, Any], fine: pd.Series, best: pd.Series, bound: pd.Series | None,
        placed: pd.Series | None = None) -> str:
    """Why FineMoE's figure departs from the paper's, from what was measured in the two runs and the
    bounds (every expert resident with layers in order and, on several GPUs, placed as FineMoE is)."""
    data = []
    if not f["embeddings"]:
        data.append("no prompt embeddings (no semantic search)")
    if f["topk_only"]:
        data.append("only top-k router probabilities (the rest unknown)")
    if f["requests"] < 20:
        data.append(f"{f['requests']} requests (a nearly empty map store)")
    tail = f" The trace has {', '.join(data)}." if data else ""
    room = ""
    if bound is not None and best["tpot_mean_s"] > 0:
        headroom = (best["tpot_mean_s"] - bound["tpot_mean_s"]) / best["tpot_mean_s"]
        room = (f" The budget holds {min(fine['budget_total_bytes'] / f['expert_bytes'], 1):.0%} of all experts: keeping "
                f"every expert resident (no copies at all) would be {headroom:.0%} faster than {best['policy']}.")
    if placed is not None and bound is not None and bound["tpot_mean_s"] > 0:
        room += (f" Placement alone: every expert resident is {ms(placed['tpot_mean_s'])} ms placed round_robin as "
                 f"FineMoE is, {ms(bound['tpot_mean_s'])} ms with layers in order as {best['policy']} is "
                 f"({percent((bound['tpot_mean_s'] - placed['tpot_mean_s']) / bound['tpot_mean_s'])} lower).")
    return (f"One copy takes {f['copy_over_layer']:.1f}x a layer's compute. FineMoE: {measured(fine)}; "
            f"{best['policy']}: {measured(best)}.{room}{tail}")


def comparison(part: pd.DataFrame) -> pd.DataFrame | None:
    """FineMoE against the best of the paper's baselines, at the headline budget of one trace and setup."""
    at = part[(part["budget"] == HEADLINE_BUDGET) & (part["variant"] == "")].set_index("policy", drop=False)
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


def ms(x: float) -> str:
    return f"{x * 1e3:.1f}"


def reasons_table(at: pd.DataFrame) -> list[str]:
    lines = ["| policy | hit rate | TPOT (ms) | late | missed | links busy | prefetched bytes used | wasted GB "
             "| map accuracy |", "|---|---|---|---|---|---|---|---|---|"]
    for _, r in at.iterrows():
        lines.append(f"| {r['policy']} | {percent(r['hit_rate'])} | {ms(r['tpot_mean_s'])} | {percent(r['late_prefetch_rate'])} "
                     f"| {percent(r['miss_rate'])} | {percent(r['link_busy_fraction'])} | {percent(r['prefetch_accuracy'])} "
                     f"| {r['wasted_prefetch_bytes'] / 1e9:.1f} | {percent(r.get('map_accuracy', math.nan))} |")
    return lines


def ours_against_all(at: pd.DataFrame, part: pd.DataFrame) -> list[str]:
    """Ours against FineMoE and every baseline (not the bounds) on mean TPOT, held-out requests; on
    several GPUs again with every policy placed round_robin as FineMoE is."""
    if OURS not in at.index:
        return []
    others = at[~at["policy"].isin(BOUNDS + (OURS,))]
    if others.empty:
        return []
    best = others.loc[others["tpot_mean_s"].idxmin()]
    ours = at.loc[OURS]
    margin = (best["tpot_mean_s"] - ours["tpot_mean_s"]) / best["tpot_mean_s"]
    line = (f"Ours (`{OURS}`) against the best of FineMoE and every baseline, {best['policy']}: mean TPOT "
            f"{ms(ours['tpot_mean_s'])} ms against {ms(best['tpot_mean_s'])} ms, {percent(margin)} lower "
            f"({'meets' if margin >= 0.10 else 'misses'} the 10% target).")
    if "all_resident" in at.index:
        bound = (best["tpot_mean_s"] - at.loc["all_resident", "tpot_mean_s"]) / best["tpot_mean_s"]
        line += f" Every expert resident (no copies at all) would be {percent(bound)} lower."
    lines = [line, ""]
    placed = part[(part["budget"] == HEADLINE_BUDGET) & (part["variant"] == PLACED)]
    if OURS in set(placed["policy"]):
        placed = pd.concat([placed, at[at["policy"] == "finemoe"]]).set_index("policy", drop=False)
        rivals = placed[~placed["policy"].isin(BOUNDS + (OURS,))]
        rival, ours = rivals.loc[rivals["tpot_mean_s"].idxmin()], placed.loc[OURS]
        margin = (rival["tpot_mean_s"] - ours["tpot_mean_s"]) / rival["tpot_mean_s"]
        lines += [f"Every policy placed round_robin, as FineMoE is (like-for-like with it): ours {ms(ours['tpot_mean_s'])} "
                  f"ms against the best of FineMoE and every baseline, {rival['policy']}, {ms(rival['tpot_mean_s'])} ms: "
                  f"{percent(margin)} lower ({'meets' if margin >= 0.10 else 'misses'} the 10% target).", "",
                  "| policy placed round_robin | hit rate | TPOT (ms) | late | links busy |", "|---|---|---|---|---|"]
        lines += [f"| {r['policy']} | {percent(r['hit_rate'])} | {ms(r['tpot_mean_s'])} | {percent(r['late_prefetch_rate'])} "
                  f"| {percent(r['link_busy_fraction'])} |" for _, r in placed.iterrows()] + [""]
    return lines


def ablation_table(part: pd.DataFrame) -> list[str]:
    at = part[(part["budget"] == HEADLINE_BUDGET) & (part["policy"] == OURS)]
    if len(at) < 2:
        return []
    full = at[at["variant"] == ""]
    if full.empty:
        return []
    base = full.iloc[0]["tpot_mean_s"]
    lines = [f"Ablation of ours at {HEADLINE_BUDGET} (each row takes ideas out; TPOT change against ours in full):", "",
             "| variant | hit rate | TPOT (ms) | TPOT vs ours | late | prefetched bytes used |", "|---|---|---|---|---|---|"]
    for _, r in at.iterrows():
        name = "reuse placed round_robin, as FineMoE is" if r["variant"] == PLACED else r["variant"] or "reuse (ours, in full)"
        lines.append(f"| {name} | {percent(r['hit_rate'])} | {ms(r['tpot_mean_s'])} | "
                     f"{(r['tpot_mean_s'] - base) / base:+.1%} | {percent(r['late_prefetch_rate'])} | "
                     f"{percent(r['prefetch_accuracy'])} |")
    return lines + [""]


def setup_label(hardware: str, budget_scope: str) -> str:
    gpus = resolve_hardware(hardware).num_gpus
    if gpus == 1:
        return f"`{hardware}` (one GPU)"
    scope = "each GPU's" if budget_scope == "per_gpu" else "the total, split evenly"
    return f"`{hardware}` ({gpus} GPUs; a budget is {scope}, as in the FineMoE artifact; FineMoE placed round_robin)"


def made_here(command: str) -> str:
    """Commit, command and machine of a table, as the reader needs them to regenerate it."""
    commit = git_commit() or "no git commit"
    return (f"Commit `{commit[:12]}`, command `{command}`, machine {platform.node()} ({platform.machine()}, "
            f"{os.cpu_count()} CPU cores, {platform.system()}).")


def tuning_table(tuning: pd.DataFrame, trace: str, hardware: str, fmt: str) -> list[str]:
    """The tuning sweep of ours on the training split of one trace, setup and format."""
    part = tuning[(tuning["trace"] == trace) & (tuning["hardware"] == hardware) & (tuning["expert_format"] == fmt)]
    if part.empty:
        return []
    lines = [(f"Tuning of ours on the training split ({part['requests'].iloc[0]} of its requests replayed after the "
              f"rest trained; the held-out requests are not used), at {HEADLINE_BUDGET}:"), "",
             "| knobs | hit rate | TPOT (ms) |", "|---|---|---|"]
    low = part["tpot_mean_s"].min()
    for _, r in part.iterrows():
        mark = " (chosen)" if r["tpot_mean_s"] == low else ""
        lines.append(f"| `{r['policy_params']}`{mark} | {percent(r['hit_rate'])} | {ms(r['tpot_mean_s'])} |")
    return lines + [""]


def markdown(frame: pd.DataFrame, trace_facts: dict[tuple[str, str, str], dict[str, Any]], kinds: dict[str, str],
             setups: list[str], budget_scope: str, split: dict[str, str], tuning: pd.DataFrame, command: str) -> str:
    claims = {"latency_reduction": "lower inference latency", "hit_rate_gain": "higher expert hit rate",
              "tpot_reduction": "lower TPOT"}
    lines = ["# FineMoE's comparison, reproduced on real routing", "",
             "Budgets are GB of expert memory for the real model of each trace's routing shape; on a multi-GPU "
             "setup each GPU's (the total is given beside it). Hit rate: expert uses found resident when the "
             "router has run; a prefetch still in flight is late, not a hit. TPOT: mean time between output "
             "tokens of the held-out (replayed) requests; policies that learn (ProMoE, MoEpic, FineMoE's and "
             "MoE-Infinity's stores, ours) learn only on the training requests before them. Links busy: bytes "
             "copied at the profile's rate over all links' time. Generated by `python -m sim.reproduce`.", "",
             made_here(command), ""]
    main = frame[frame["trace"].map(kinds) == "real"]
    lines += ["## Main table: real routing", ""]
    if main.empty:
        lines += ["No real trace was given.", ""]
    for trace in dict.fromkeys(main["trace"]):
        lines += [f"### {trace}", ""]
        for hardware, fmt in dict.fromkeys(zip(main["hardware"], main["expert_format"])):
            part = main[(main["trace"] == trace) & (main["hardware"] == hardware) & (main["expert_format"] == fmt)]
            if part.empty:
                continue
            f = trace_facts[(trace, hardware, fmt)]
            plain = part[part["variant"] == ""]
            at = plain[plain["budget"] == HEADLINE_BUDGET].set_index("policy", drop=False)
            total = at["budget_total_bytes"].iloc[0] if len(at) else 0
            lines += [f"#### {trace} on {setup_label(hardware, budget_scope)}, experts in {fmt}", "",
                      made_here(command), "",
                      f"Routing: {f['source']}. {f['requests']} requests ({split[trace]}); token-to-token expert reuse "
                      f"{percent(f['reuse'])}; prompt embeddings {'yes' if f['embeddings'] else 'no'}; full router "
                      f"probabilities {'no (top-k only)' if f['topk_only'] else 'yes'}. One expert copy = "
                      f"{f['copy_over_layer']:.1f}x a decode layer's compute. All experts: {f['expert_bytes'] / 1e9:.1f} GB; "
                      f"{HEADLINE_BUDGET} per GPU is {total / 1e9:.0f} GB in all.", "",
                      "Expert hit rate:", "", pivot(plain, "hit_rate", percent), "",
                      "TPOT (ms):", "", pivot(plain, "tpot_mean_s", ms), "",
                      f"At {HEADLINE_BUDGET}, what was measured:", ""] + reasons_table(at) + [""]
            table = comparison(part)
            if table is not None:
                lines += [f"FineMoE against the best of the paper's baselines (MoE-Infinity, ProMoE, Mixtral-Offloading, "
                          f"DeepSpeed) at {HEADLINE_BUDGET}; the paper's 47% and 36% are averages over its settings, 32% "
                          "is at 6 GB:", "",
                          "| metric | best baseline | baseline | FineMoE | measured gain | paper |", "|---|---|---|---|---|---|"]
                units = {"e2e_mean_s": lambda x: f"{x:.2f} s", "tpot_mean_s": lambda x: f"{ms(x)} ms", "hit_rate": percent}
                for _, r in table.iterrows():
                    value = units[r["column"]]
                    lines.append(f"| {claims[r['metric']]} | {r['best_baseline']} | {value(r['baseline_value'])} | "
                                 f"{value(r['finemoe_value'])} | {percent(r['ours'])} | {percent(r['paper'])} |")
                bound = at.loc["all_resident"] if "all_resident" in at.index else None
                spread = part[(part["budget"] == HEADLINE_BUDGET) & (part["variant"] == PLACED)
                              & (part["policy"] == "all_resident")]
                placed = spread.iloc[0] if len(spread) else None
                differ = [r for _, r in table.iterrows() if not abs(r["ours"] - r["paper"]) <= DIFFERENCE_TOLERANCE]
                lines += [""]
                if differ:
                    lines += ["Where ours differ (" + ", ".join(claims[r["metric"]] for r in differ) + "): "
                              + why(f, differ[-1]["finemoe"], differ[-1]["best"], bound, placed), ""]
                else:
                    lines += ["All three within 10 points of the paper.", ""]
            lines += ours_against_all(at, part) + ablation_table(part) + tuning_table(tuning, trace, hardware, fmt)
    other = frame[frame["trace"].map(kinds) != "real"]
    if not other.empty:
        lines += ["## Synthetic and stand-in routing (not real: generated, or from small models trained here)", "",
                  f"At {HEADLINE_BUDGET} on {setup_label(setups[-1], budget_scope)}; for comparison only, no claim "
                  "rests on these.", ""]
        table = other.pivot_table(index="policy", columns="trace", values="tpot_mean_s", sort=False, observed=True)
        hits = other.pivot_table(index="policy", columns="trace", values="hit_rate", sort=False, observed=True)
        label = {t: f"{t} ({kinds[t]})" for t in table.columns}
        lines += ["TPOT (ms):", "", table.map(ms).rename(columns=label).to_markdown(), "",
                  "Expert hit rate:", "", hits.map(percent).rename(columns=label).to_markdown(), ""]
    return "\n".join(lines)


def plot(frame: pd.DataFrame, trace: str, hardware: str, fmt: str, column: str, ylabel: str, out: Path) -> None:
    part = frame[(frame["trace"] == trace) & (frame["hardware"] == hardware) & (frame["expert_format"] == fmt)
                 & (frame["variant"] == "")]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for policy, rows in part.groupby("policy", sort=False, observed=True):
        rows = rows.sort_values("budget_bytes")
        style = "--" if policy in BOUNDS else "-"
        ax.plot(rows["budget_bytes"] / 1e9, rows[column] * (1e3 if column.endswith("_s") else 1), style, marker="o",
                label=policy, linewidth=2.5 if policy == "finemoe" else 1.2)
    ax.set(xlabel="expert memory budget (GB)", ylabel=ylabel, title=f"{trace} on {hardware} ({fmt}): {ylabel} against budget", xscale="log")
    budgets_gb = sorted({b / 1e9 for p, b in zip(part["policy"], part["budget_bytes"]) if not policy_class(p).ignores_budget})
    ax.set_xticks(budgets_gb, [f"{b:g}" for b in budgets_gb])
    ax.minorticks_off()
    if column.endswith("_s"):
        ax.set_yscale("log")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    atomic_save_figure(fig, out)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments (the README's command lines are checked against it)."""
    parser = ArgumentParser(prog="python -m sim.reproduce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("results/reproduce"))
    parser.add_argument("--hardware", default=",".join(SETUPS), help="comma-separated hardware profiles: the paper's "
                        "testbed (rtx3090x6) and one of its GPUs (rtx3090) by default")
    parser.add_argument("--formats", default=",".join(FORMATS), help="expert formats of real traces, comma-separated: "
                        "own (the trace model's) and/or bf16, fp8, int4, mxfp4")
    parser.add_argument("--budget-scope", default="per_gpu", choices=("per_gpu", "total"),
                        help="with several GPUs: each GPU's budget, or the total split evenly")
    parser.add_argument("--budgets", default=",".join(BUDGETS), help="paper sizes per GPU, comma-separated (include 6GB)")
    parser.add_argument("--traces", help="comma-separated shipped trace names or trace directories (default: all shipped; "
                        "real routing enters the main table, the others a separate one)")
    parser.add_argument("--no-ablation", action="store_true", help="leave out the ablation of ours")
    parser.add_argument("--policies", help="comma-separated (default: every registered policy)")
    parser.add_argument("--train-requests", type=int, default=32, help="leading requests that train (at most half)")
    parser.add_argument("--replay-requests", type=int, default=6, help="requests replayed after them")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (processes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help=f"only {HEADLINE_BUDGET}, 2 replayed requests")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)

    def work() -> None:
        names = args.traces.split(",") if args.traces else shipped_traces()
        if not names:
            raise UserError("no shipped trace found; pass --traces PATH")
        traces = [shared_trace(resolve_trace(name)) for name in names]
        policies = args.policies.split(",") if args.policies else shipped()
        budgets = list(QUICK_BUDGETS) if args.quick else args.budgets.split(",")
        if HEADLINE_BUDGET not in budgets:
            raise UserError(f"--budgets must include {HEADLINE_BUDGET}, where the paper's TPOT claim is made")
        for label in budgets:
            budget_bytes(label, traces[0].model)  # one clear error for a malformed size
        replay = 2 if args.quick else args.replay_requests
        setups = args.hardware.split(",")
        for hardware in setups:
            resolve_hardware(hardware)  # one clear error for an unknown profile
        formats = args.formats.split(",")
        for fmt in formats:
            if fmt != "own":
                traces[0].model.with_format(fmt)  # one clear error for an unknown format
        tuning_runs = plan_tuning(traces, setups, formats, args.budget_scope, args.train_requests, replay,
                                  args.seed) \
            if OURS in policies else []
        untuned = plan_runs(traces, policies, budgets, setups, args.budget_scope, args.train_requests, replay,
                            args.seed, not args.no_ablation, formats)
        for run in {r.cfg.policy: r for r in untuned}.values():
            prepare(run.cfg)  # one clear error for a bad policy, hardware or trace, before any run
        tuning = run_all(tuning_runs, args.jobs, args.out) if tuning_runs else pd.DataFrame(
            columns=["trace", "hardware", "expert_format", "variant", "tpot_mean_s"])
        runs = plan_runs(traces, policies, budgets, setups, args.budget_scope, args.train_requests, replay,
                         args.seed, not args.no_ablation, formats, tuned_knobs(tuning))
        frame = run_all(runs, args.jobs, args.out)
        trace_facts = {(t.path.name, h, f): facts(t, h, f) for t in traces for h in setups for f in formats_of(t, formats)}
        kinds = {t.path.name: routing_kind(t) for t in traces}
        split = {}
        for t in traces:
            first = next(r for r in runs if r.trace == t.path.name)
            train, replayed = split_requests(t.num_requests, first.cfg.train_fraction, first.cfg.max_requests)
            split[t.path.name] = f"{len(train)} train, {len(replayed)} replayed"
        atomic_write_csv(args.out / "runs.csv", frame)
        command = "python -m sim.reproduce " + " ".join(argv if argv is not None else sys.argv[1:])
        atomic_write_text(args.out / "reproduction.md", markdown(frame, trace_facts, kinds, setups, args.budget_scope,
                                                                 split, tuning, command))
        for t, h, f in trace_facts:
            if kinds[t] == "real" and len(budgets) > 1:
                name = f"{t.replace('/', '_')}_{h}_{f}"
                plot(frame, t, h, f, "hit_rate", "expert hit rate", args.out / f"{name}_hit_rate.png")
                plot(frame, t, h, f, "tpot_mean_s", "TPOT (ms)", args.out / f"{name}_tpot.png")
        print(f"{len(frame)} runs; budgets {', '.join(format_bytes(b) for b in sorted(set(frame['budget_bytes'])))}")
        left = cpu_less(policies, setups)
        if left:
            print(f"left out where the profile has no host CPU ({', '.join(h for h in setups if resolve_hardware(h).cpu is None)}): "
                  f"{', '.join(left)} (they compute experts on it; python -m sim.breakeven compares them)")
        print(f"written: {args.out}/runs.csv, reproduction.md, *_hit_rate.png, *_tpot.png")

    run_cli(work)


if __name__ == "__main__":
    main()
