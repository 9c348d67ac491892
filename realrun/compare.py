"""python -m realrun.compare [--policies all] [--budgets auto] [--layers 8] [--hardware h100-measured] [--out DIR]

Runs the same trace, policies and budgets through the simulator (on the calibrated hardware
profile) and through realrun's executor on this machine's GPU, and writes:
    runs.csv      every metric of every run, one row per (engine, policy, budget)
    compare.csv   simulated against measured TTFT, TPOT (mean, p50, p99), hit rate, bytes moved,
                  with relative errors (hit rate: difference in points) and whether the targets hold
    compare.md    the same as a Markdown table (printed last)
  with --timeline (measured runs only; two timing events per kernel group, about 30 us each):
    timeline.csv  every kernel group and wait: host launch, GPU start and end (realrun.executor.Timeline)
  with --clocks (NVML read every 0.2 ms by another process, which slows the executor's host down):
    clocks.csv    the GPU's SM clock over the whole comparison, on the same clock (realrun.gpu_clocks)
Targets: mean TPOT within 5% of the measured one, hit rate within 1 point.
"""
from __future__ import annotations

import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from policies import policy_class, shipped
from realrun.api import execute_real
from realrun.calibrate import profile_name
from realrun.executor import COPY_WAITS, Machine, RealOptions, Timeline
from realrun.kernels import REALRUN_FORMAT, realrun_model
from realrun.gpu_clocks import ClockLog
from realrun.subset import first_layers
from sim.api import RunResult, execute, prepare
from sim.budget import format_bytes, parse_budget
from sim.config import SimConfig
from sim.profiles import known_hardware, load_hardware
from traces.atomic import atomic_write_csv, atomic_write_text
from traces import Trace, load_trace
from traces.cli import ArgumentParser, run_cli
from traces.defaults import resolve_trace
from traces.errors import UserError

TPOT_TARGET = 0.05  # relative
HIT_TARGET_POINTS = 1.0
TTFT_TARGET = 0.10  # relative (issue 21's target for time to first token)
MEDIAN_TPOT_TARGET = 0.02  # median |mean TPOT error| over a table's runs
BUDGET_FRACTIONS = (0.25, 0.5, 0.75)  # of all experts, for --budgets auto
TIMES = ("ttft_mean_s", "tpot_mean_s", "tpot_p50_s", "tpot_p99_s")
RUNS, LAYERS, TOKENS, TIMELINE, CLOCKS = "runs.csv", "layers.csv", "tokens.csv", "timeline.csv", "clocks.csv"
TABLE_KEYS = ["engine", "policy", "budget"]


def auto_budgets(trace: Trace) -> list[str]:
    total = trace.model.num_layers * trace.model.num_experts
    return [f"{max(1, round(total * f))}experts" for f in BUDGET_FRACTIONS]


def _relative(sim: float, real: float) -> float:
    return (sim - real) / real if real and not math.isnan(real) else float("nan")


def comparison_row(sim: dict, real: dict) -> dict:
    """One line of the table from two runs' flat metrics (see flat_metrics)."""
    row = {"policy": sim["policy"], "budget": sim["budget"], "budget_experts": sim["budget_experts"],
           "budget_bytes": sim["budget_bytes"]}
    for key in TIMES:
        row[f"{key}_sim"], row[f"{key}_real"] = sim[key], real[key]
        row[f"{key.removesuffix('_s')}_rel_err"] = _relative(sim[key], real[key])
    row["hit_rate_sim"], row["hit_rate_real"] = sim["hit_rate"], real["hit_rate"]
    row["hit_rate_diff_pts"] = 100.0 * (sim["hit_rate"] - real["hit_rate"])
    row["bytes_h2d_sim"], row["bytes_h2d_real"] = sim["bytes_h2d"], real["bytes_h2d"]
    row["bytes_h2d_rel_err"] = _relative(sim["bytes_h2d"], real["bytes_h2d"]) if real["bytes_h2d"] \
        else float(sim["bytes_h2d"] != 0)
    row["stall_s_sim"], row["stall_s_real"] = sim["stall_s"], real["stall_s"]
    # Where the time goes: waiting for copies, and the rest (compute, launches, the executor's own work).
    row["stall_rel_err"] = _relative(sim["stall_s"], real["stall_s"])
    row["rest_rel_err"] = _relative(sim["makespan_s"] - sim["stall_s"], real["makespan_s"] - real["stall_s"])
    row["tpot_mean_real_spread"] = real.get("tpot_mean_spread", float("nan"))
    row["targets_met"] = bool(abs(row["tpot_mean_rel_err"]) <= TPOT_TARGET
                              and abs(row["hit_rate_diff_pts"]) <= HIT_TARGET_POINTS)
    return row


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:+.1%}"


def _spread(x: float) -> str:
    return "" if math.isnan(x) else f" (spread {x:.1%})"


def markdown(table: pd.DataFrame, header: list[str]) -> str:
    lines = [*header, "",
             "| policy | budget | TTFT ms sim / real (err) | TPOT mean ms sim / real (err) | TPOT p50 err | TPOT p99 err "
             "| hit rate sim / real (pts) | moved sim / real | targets |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in table.itertuples():
        budget = "all (ignores it)" if row.budget_bytes == 0 \
            else f"{row.budget_experts:.0f} experts ({format_bytes(row.budget_bytes)})"
        lines.append(
            f"| {row.policy} | {budget} "
            f"| {row.ttft_mean_s_sim * 1e3:.1f} / {row.ttft_mean_s_real * 1e3:.1f} ({_pct(row.ttft_mean_rel_err)}) "
            f"| {row.tpot_mean_s_sim * 1e3:.2f} / {row.tpot_mean_s_real * 1e3:.2f}{_spread(row.tpot_mean_real_spread)} "
            f"({_pct(row.tpot_mean_rel_err)}) "
            f"| {_pct(row.tpot_p50_rel_err)} | {_pct(row.tpot_p99_rel_err)} "
            f"| {row.hit_rate_sim:.1%} / {row.hit_rate_real:.1%} ({row.hit_rate_diff_pts:+.2f}) "
            f"| {format_bytes(row.bytes_h2d_sim)} / {format_bytes(row.bytes_h2d_real)} "
            f"| {'met' if row.targets_met else 'MISSED'} |")
    figures = summary(table)
    lines += ["", f"Targets (mean TPOT within {TPOT_TARGET:.0%}, hit rate within {HIT_TARGET_POINTS:g} point): "
              f"met by {figures['met']} of {figures['runs']} runs; median |TPOT error| {figures['median_tpot_err']:.1%} "
              f"(target {MEDIAN_TPOT_TARGET:.0%}); TTFT within {TTFT_TARGET:.0%} in {figures['ttft_within']} of "
              f"{figures['runs']}.",
              f"Where the error lies (median |error| over the runs): waiting for copies "
              f"{table['stall_rel_err'].abs().median():.1%}, the rest of the time (compute, launches, the "
              f"executor's own work) {table['rest_rel_err'].abs().median():.1%}."]
    return "\n".join(lines)


def summary(table: pd.DataFrame) -> dict:
    """A table's figures against issue 21's targets: runs meeting both targets, the median |mean
    TPOT error|, runs with TTFT within TTFT_TARGET."""
    return {"runs": len(table), "met": int(table["targets_met"].sum()),
            "median_tpot_err": float(table["tpot_mean_rel_err"].abs().median()),
            "ttft_within": int((table["ttft_mean_rel_err"].abs() <= TTFT_TARGET).sum())}


def code_commit(root: Path | None = None) -> str:
    """The commit the code runs from, or 'unknown'; where the work tree differs, '+changes' and the
    git tree of the work tree as it is (untracked files git does not ignore included): a tree
    copied onto a GPU machine over an older checkout names the commit whose tree it is there
    (`git log --format='%h %T'`). REALRUN_CODE_COMMIT, when set, is taken instead."""
    if os.environ.get("REALRUN_CODE_COMMIT"):
        return os.environ["REALRUN_CODE_COMMIT"] + " (REALRUN_CODE_COMMIT)"
    root = root or Path(__file__).resolve().parent.parent

    def git(*args: str, **env: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True,
                              env={**os.environ, **env}).stdout.strip()
    try:
        head = git("rev-parse", "HEAD")
        if not git("status", "--porcelain"):
            return head
        with tempfile.TemporaryDirectory() as scratch:  # an index of its own: the checkout's is left alone
            index = str(Path(scratch) / "index")
            git("read-tree", "HEAD", GIT_INDEX_FILE=index)
            git("add", "-A", GIT_INDEX_FILE=index)
            tree = git("write-tree", GIT_INDEX_FILE=index)
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{head} +changes (work tree {tree})"


def provenance(argv: list[str], device: str, profile_validation: dict | None) -> list[str]:
    """Header lines that make a table reproducible: code, command, machine, and the profile's own
    validation figures (calibrate's short runs, realrun.validate)."""
    lines = [f"- code: {code_commit()}", f"- command: `python -m realrun.compare {shlex.join(argv)}`",
             f"- machine: {device} on host {platform.node()}, {platform.platform()}"]
    if profile_validation:
        checks = ", ".join(f"{c['policy']} {c['tpot_rel_err']:+.1%}" for c in profile_validation["checks"])
        residual = profile_validation.get("residual_error") or {}
        fitted = profile_validation.get("fitted") or {}
        where = f" on request {profile_validation['request']}" if "request" in profile_validation else ""
        lines.append(f"- profile's validation (calibrate's short runs{where}, TPOT error): {checks}"
                     + (f"; residual beyond {profile_validation['tolerance']:.0%}: "
                        + ", ".join(f"{t} {e:+.1%}" for t, e in residual.items()) if residual else "")
                     + ("; taken from its executor runs: " + ", ".join(f"{t} x{f:.3f}" for t, f in fitted.items())
                        if fitted else ""))
    else:
        lines.append("- profile's validation: none recorded (a profile from before calibrate validated)")
    return lines


def flat_metrics(result: RunResult, engine: str, budget: str) -> dict:
    data = result.metrics.to_dict()
    info = data.pop("policy_info")
    return {"engine": engine, "budget": budget, **data, "realrun": " | ".join(info.get("realrun", [])),
            "wall_s": result.wall_s}


@dataclass
class Measured:
    """One measured run: its flat metrics (see flat_metrics), per-layer and per-token tables."""

    flat: dict
    layers: pd.DataFrame
    tokens: pd.DataFrame


def median_run(runs: list[Measured]) -> Measured:
    """The run of median mean TPOT (the lower middle one of an even count), marked `chosen` among
    them, with the spread of their mean TPOTs relative to it (tpot_mean_spread)."""
    tpots = [run.flat["tpot_mean_s"] for run in runs]
    pick = sorted(range(len(runs)), key=tpots.__getitem__)[(len(runs) - 1) // 2]
    for i, run in enumerate(runs):
        run.flat["chosen"] = i == pick
    chosen = runs[pick]
    chosen.flat["tpot_mean_spread"] = (max(tpots) - min(tpots)) / chosen.flat["tpot_mean_s"]
    return chosen


class StoredRuns:
    """The measured side of earlier compares (runs.csv, layers.csv, tokens.csv of each directory),
    to re-join with a simulator changed since (it is deterministic and needs no GPU). The repeats of
    every directory are pooled: the median of all of them is compared."""

    def __init__(self, *directories: Path):
        runs, layers, tokens = [], [], []
        for directory in directories:
            try:
                found = pd.read_csv(directory / RUNS).query("engine == 'real'")
                # A comparison cut short has only its runs.csv (written after every measured run).
                by_layer, by_token = (pd.read_csv(directory / name).query("engine == 'real'")
                                      if (directory / name).is_file() else pd.DataFrame(columns=TABLE_KEYS)
                                      for name in (LAYERS, TOKENS))
            except (OSError, pd.errors.ParserError) as exc:
                raise UserError(f"--real-from {directory}: cannot read an earlier compare's results ({exc})") from None
            found = found.assign(**{"repeat": found.get("repeat", 0), "chosen": found.get("chosen", True),
                                    "source": found.get("source", str(directory))})
            # Compares before every repeat's tables were kept stored the chosen repeat's alone.
            chosen = found[found["chosen"].astype(bool)][["policy", "budget", "repeat"]]
            source = found["source"].iloc[0] if len(found) else ""
            runs.append(found)
            layers.append(self._with_repeat(by_layer, chosen, source))
            tokens.append(self._with_repeat(by_token, chosen, source))
        self.runs = pd.concat(runs, ignore_index=True)
        self.layers, self.tokens = pd.concat(layers, ignore_index=True), pd.concat(tokens, ignore_index=True)

    @staticmethod
    def _with_repeat(frame: pd.DataFrame, chosen: pd.DataFrame, source: str) -> pd.DataFrame:
        if "repeat" not in frame.columns:
            frame = frame.merge(chosen, on=["policy", "budget"], how="left")
        return frame.assign(source=frame.get("source", source))

    def get(self, policy: str, budget: str) -> list[Measured]:
        def pick(frame: pd.DataFrame) -> pd.DataFrame:
            return frame[(frame["policy"] == policy) & (frame["budget"] == budget)]
        runs = pick(self.runs)
        if runs.empty:
            raise UserError(f"--real-from has no measured run of {policy} at {budget}; run it on the GPU")
        layers, tokens = pick(self.layers), pick(self.tokens)

        def of(run: dict, frame: pd.DataFrame) -> pd.DataFrame:
            mine = frame[(frame["source"] == run["source"]) & (frame["repeat"] == run["repeat"])]
            return mine.drop(columns=[*TABLE_KEYS, "source", "repeat"])
        return [Measured(run, of(run, layers), of(run, tokens)) for run in runs.to_dict("records")]


def _token_frame(result: RunResult) -> pd.DataFrame:
    return pd.DataFrame({"token": range(len(result.token_latencies_s)), "latency_s": result.token_latencies_s})


def _tagged(frame: pd.DataFrame, engine: str, policy: str, budget: str) -> pd.DataFrame:
    return frame.assign(engine=engine, policy=policy, budget=budget)[[*TABLE_KEYS, *frame.columns]]


def run_compare(trace: Trace, policies: list[str], budgets: list[str], hardware: str, machine: Machine | None,
                out_dir: Path, max_requests: int | None = None, warm_start: bool = False, train_fraction: float | None = None,
                header: list[str] | None = None, stored: StoredRuns | None = None, timeline: bool = False,
                clocks: bool = False, repeats: int = 1, gpus: int = 1) -> pd.DataFrame:
    """Both engines over every (policy, budget); writes runs.csv, layers.csv, tokens.csv, compare.csv
    and compare.md. With `stored`, the measured side comes from earlier compares instead. With
    `timeline`, every measured run's kernel groups are recorded too; with `clocks`, the GPU's clock.
    With `repeats` > 1, every measured run is made that many times (in rounds over all runs), and the
    one of median mean TPOT is compared (runs.csv, layers.csv and tokens.csv keep them all, with their
    `repeat`; `chosen` marks it in runs.csv; the spread of their
    mean TPOTs, relative to it, is tpot_mean_spread). `gpus`: the layers split over that many devices
    in both engines (the machine's own count when there is one)."""
    if repeats < 1:
        raise UserError(f"--repeats {repeats}: give 1 or more")
    out_dir.mkdir(parents=True, exist_ok=True)
    clocks = clocks and stored is None and machine.backends[0].is_cuda
    with ClockLog(enabled=clocks) as log:
        table = _compare_runs(trace, policies, budgets, hardware, machine, out_dir, max_requests, warm_start,
                              train_fraction, header, stored, timeline, repeats,
                              gpus if machine is None else machine.topology.num_gpus)
    if clocks:
        atomic_write_csv(out_dir / CLOCKS, log.samples)
    return table


def _measure(cfg: SimConfig, trace: Trace, machine: Machine, timeline: bool) -> tuple[RunResult, pd.DataFrame | None]:
    run = prepare(cfg, trace)
    recorder = Timeline() if timeline else None
    with tqdm(total=len(run.replay), desc=f"{cfg.policy} {cfg.budget} on {machine.device_name}", unit="req",
              leave=False) as bar:
        real = execute_real(run, machine, on_request_done=lambda _r: bar.update(), timeline=recorder)
    return real, None if recorder is None else recorder.frame()


def _compare_runs(trace: Trace, policies: list[str], budgets: list[str], hardware: str, machine: Machine | None,
                  out_dir: Path, max_requests: int | None, warm_start: bool, train_fraction: float | None,
                  header: list[str] | None, stored: StoredRuns | None, timeline: bool, repeats: int,
                  gpus: int) -> pd.DataFrame:
    profile = load_hardware(hardware)
    if profile.num_gpus < gpus:  # a profile of more GPUs serves fewer: the simulator takes its first ones
        raise UserError(f"hardware '{profile.name}' describes {profile.num_gpus} GPU(s), the runs use {gpus}: give a "
                        f"profile of {gpus} or more (python -m realrun.calibrate --gpus {gpus})")
    bytes_per_expert = realrun_model(trace.model).bytes_per_expert  # both engines run realrun's expert format
    jobs = []
    for policy in policies:
        if policy_class(policy).ignores_budget:
            jobs.append((policy, budgets[0]))  # its budget is everything: one run
        else:
            jobs.extend((policy, b) for b in sorted(budgets, key=lambda b: parse_budget(b, bytes_per_expert)))
    configs = {job: SimConfig(trace=str(trace.path), policy=job[0], budget=job[1], hardware=profile.to_dict(),
                              max_requests=max_requests, warm_start=warm_start, train_fraction=train_fraction,
                              gpus=gpus, expert_format=REALRUN_FORMAT)
               for job in jobs}
    measured: dict[tuple[str, str], list[Measured]] = {job: [] for job in jobs}
    if stored is None:
        flats, timelines = [], []
        # Rounds over every job, not repeats back to back: the host's speed drifts over minutes, and
        # each job's repeats should sample it alike.
        with tqdm(total=len(jobs) * repeats, desc="measured runs", unit="run") as bar:
            for repeat in range(repeats):
                for policy, budget in jobs:
                    real, frame = _measure(configs[policy, budget], trace, machine, timeline)
                    flat = flat_metrics(real, "real", budget) | {"repeat": repeat}
                    measured[policy, budget].append(Measured(flat, real.per_layer, _token_frame(real)))
                    flats.append(flat)
                    # Kept up to date after every run: a long comparison may be cut short.
                    atomic_write_csv(out_dir / RUNS, pd.DataFrame(flats))
                    if frame is not None:
                        timelines.append(_tagged(frame, "real", policy, budget).assign(repeat=repeat))
                        atomic_write_csv(out_dir / TIMELINE, pd.concat(timelines, ignore_index=True))
                    bar.update()
    rows, runs, layers, tokens = [], [], [], []
    for policy, budget in tqdm(jobs, desc="simulated runs", unit="run", leave=False):
        sim = execute(prepare(configs[policy, budget], trace))
        sim_flat = flat_metrics(sim, "sim", budget)
        candidates = measured[policy, budget] if stored is None else stored.get(policy, budget)
        real = median_run(candidates)
        row = comparison_row(sim_flat, real.flat)
        if policy_class(policy).ignores_budget:
            row["budget"], row["budget_bytes"], row["budget_experts"] = "all", 0, float("nan")
        rows.append(row)
        runs += [sim_flat, real.flat, *(c.flat for c in candidates if c is not real)]
        layers.append(_tagged(sim.per_layer, "sim", policy, budget))
        tokens.append(_tagged(_token_frame(sim), "sim", policy, budget))
        for c in candidates:  # every repeat's tables, to pool with later measurements
            extra = {"repeat": c.flat["repeat"], **({"source": c.flat["source"]} if "source" in c.flat else {})}
            layers.append(_tagged(c.layers, "real", policy, budget).assign(**extra))
            tokens.append(_tagged(c.tokens, "real", policy, budget).assign(**extra))
    atomic_write_csv(out_dir / RUNS, pd.DataFrame(runs))
    atomic_write_csv(out_dir / LAYERS, pd.concat(layers, ignore_index=True))
    atomic_write_csv(out_dir / TOKENS, pd.concat(tokens, ignore_index=True))
    table = pd.DataFrame(rows)
    atomic_write_csv(out_dir / "compare.csv", table)
    atomic_write_text(out_dir / "compare.md", markdown(table, header or []) + "\n")
    return table


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m realrun.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", default="default", help="'default', a shipped trace, or a trace directory")
    parser.add_argument("--policies", default="all", help="comma-separated, or 'all' registered policies")
    parser.add_argument("--budgets", default="auto",
                        help="comma-separated (6GB, 32experts...), or 'auto': 1/4, 1/2, 3/4 of all experts")
    parser.add_argument("--layers", type=int, default=None, help="run only the first N layers (host memory, time)")
    parser.add_argument("--max-requests", type=int, default=None)
    parser.add_argument("--hardware", default=None, help="profile for the simulator (default: this GPU's -measured)")
    parser.add_argument("--device", default=RealOptions.device)
    parser.add_argument("--gpus", type=int, default=RealOptions.gpus,
                        help="split the layers over devices cuda:0..N-1 (and N simulated GPUs); budgets are per GPU")
    parser.add_argument("--host-sources", type=int, default=RealOptions.host_sources, help="pinned host buffers shared by experts (0: one each)")
    parser.add_argument("--kv-tokens", type=int, default=RealOptions.kv_tokens)
    parser.add_argument("--copy-wait", default=RealOptions.copy_wait, choices=COPY_WAITS,
                        help="how the executor waits for a block: poll its copy's event, or sleep until it lands")
    parser.add_argument("--warm-start", action="store_true")
    parser.add_argument("--train-fraction", type=float, default=None,
                        help="leading share of requests for policies' offline training (default: 0.25 for a policy "
                             "that learns offline, such as promoe, 0 for the others)")
    parser.add_argument("--real-from", default=None,
                        help="directories of earlier compares (comma-separated): reuse their measured runs, pooling "
                             "their repeats, and re-run only the simulator")
    parser.add_argument("--graphs", action="store_true",
                        help="launch one-token decode passes as CUDA graphs (realrun/graphs.py)")
    parser.add_argument("--timeline", action="store_true",
                        help="also record every kernel group's host and GPU times (timeline.csv)")
    parser.add_argument("--clocks", action="store_true",
                        help="also read the GPU's SM clock throughout (clocks.csv; perturbs the host's timing)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="measure each run N times, in rounds, and compare the median one (the spread shows the noise)")
    parser.add_argument("--out", default="results/compare")
    args = parser.parse_args(argv)

    def work() -> None:
        out = Path(args.out)
        trace = load_trace(resolve_trace(args.trace))
        full_layers = trace.model.num_layers
        if args.layers is not None:
            trace = first_layers(trace, args.layers, out / f"trace-{args.layers}-layers")
        policies = shipped() if args.policies == "all" \
            else [p for p in args.policies.split(",") if p]
        for p in policies:
            policy_class(p)  # unknown names fail here, in one line
        budgets = auto_budgets(trace) if args.budgets == "auto" else [b for b in args.budgets.split(",") if b]
        stored = machine = None
        if args.real_from:
            stored = StoredRuns(*(Path(d) for d in args.real_from.split(",") if d))
            notes = str(stored.runs["realrun"].iloc[0]).split(" | ") if len(stored.runs) else []
            device = stored.runs["hardware"].iloc[0].removeprefix("real: ") if len(stored.runs) else "?"
            if args.hardware is None:
                raise UserError("--real-from needs --hardware: the profile the simulator runs on")
        else:
            options = RealOptions(device=args.device, gpus=args.gpus, host_sources=args.host_sources,
                                  kv_tokens=args.kv_tokens, copy_wait=args.copy_wait, graphs=args.graphs)
            machine = Machine(trace.model, options)
            notes, device = machine.notes(), machine.device_name
        hardware = args.hardware or profile_name(device, args.gpus)
        if args.hardware is None and hardware not in known_hardware():
            raise UserError(f"no profile '{hardware}' for this GPU: run python -m realrun.calibrate first, "
                            "or give --hardware NAME")
        subset = " (a subset: host memory and time)" if trace.model.num_layers < full_layers else ""
        validation = load_hardware(hardware).extra.get("calibration", {}).get("validation")
        header = [f"# Simulated ({hardware}) against measured ({device})", "",
                  *provenance(sys.argv[1:] if argv is None else argv, device, validation), "",
                  f"Trace: {args.trace} ({trace.source.label()}); model {trace.model.name}, "
                  f"{trace.model.num_layers} of {full_layers} layers{subset}; requests: {args.max_requests or 'all'}",
                  *([f"- experts at {REALRUN_FORMAT} size ({format_bytes(realrun_model(trace.model).bytes_per_expert)} "
                     f"each; the model ships {trace.model.expert_format}) in both engines: realrun's kernels are "
                     f"{REALRUN_FORMAT}"] if trace.model.expert_format != REALRUN_FORMAT else []),
                  *([f"- layers split over {args.gpus} GPUs in order; every budget is each GPU's"] if args.gpus > 1 else []),
                  *[f"- {note}" for note in notes]]
        table = run_compare(trace, policies, budgets, hardware, machine, out, args.max_requests, args.warm_start,
                            args.train_fraction, header, stored, args.timeline, args.clocks, args.repeats, args.gpus)
        print(f"results: {out}")
        print(markdown(table, header))
    run_cli(work)


if __name__ == "__main__":
    main()
