"""Writing and printing a run's results. Every file is written under a temporary name and renamed."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sim.api import RunResult
from sim.budget import format_bytes
from sim.config import DEFAULT_TRAIN_FRACTION
from sim.overload import open_loop_load
from sim.provenance import PROVENANCE_FILE, provenance
from traces.atomic import atomic_write_csv, atomic_write_text, write_atomically  # noqa: F401 (re-exported)
from traces.cli import console as cli_console

METRICS_FILE = "metrics.json"
REQUESTS_FILE = "requests.csv"
LAYERS_FILE = "layers.csv"
CONFIG_FILE = "run_config.json"
TIMING_FILE = "timing.json"  # the run's wall time


def atomic_save_figure(fig, path: Path) -> None:
    """Save a matplotlib figure, in the format its suffix names, without ever leaving half a file."""
    write_atomically(path, lambda tmp: fig.savefig(tmp, format=path.suffix.lstrip(".")))


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and value != value:
        return None  # NaN is not JSON
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item"):
        return value.item()
    return value


def config_json(config: dict[str, Any]) -> str:
    """A run's config as run_config.json holds it (sim.sweep compares a new run's config with it)."""
    return json.dumps(_jsonable(config), indent=2, sort_keys=True)


def write_run(result: RunResult, out_dir: str | Path) -> Path:
    """metrics.json, requests.csv, layers.csv, timing.json, the run's config and provenance (sim.provenance: the
    trace's hash, the code's version); metrics.json last (marks a complete run)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / CONFIG_FILE, config_json(result.config))
    atomic_write_text(out / PROVENANCE_FILE, json.dumps(provenance(result.config["trace"]), indent=2, sort_keys=True))
    atomic_write_csv(out / REQUESTS_FILE, result.per_request)
    atomic_write_csv(out / LAYERS_FILE, result.per_layer)
    # The wall time varies between identical runs: it stays out of metrics.json, which is then the
    # same byte for byte for the same config, alone or in a sweep, in any process.
    atomic_write_text(out / TIMING_FILE, json.dumps({"wall_s": result.wall_s}))
    atomic_write_text(out / METRICS_FILE, json.dumps(_jsonable(result.metrics.to_dict()), indent=2, sort_keys=True))
    return out


def _ms(seconds: float) -> str:
    return "-" if seconds != seconds else f"{seconds * 1e3:.2f}"


def print_run(result: RunResult, console: Console | None = None) -> None:
    console = console or cli_console()
    m = result.metrics
    reuse = "unknown" if m.trace_token_reuse is None else f"{m.trace_token_reuse:.1%}"
    distance = ("unknown (no real trace of this routing shape)" if m.trace_distance_to_real is None
                else f"{m.trace_distance_to_real:.1%}")
    # The origin names the weights' origin in brackets, which rich would take for markup.
    console.print(f"[bold]trace[/]: {escape(m.trace)}\n[bold]routing from[/]: {escape(m.trace_origin)}\n"
                  f"[bold]token-to-token expert reuse[/]: {reuse} (real Mixtral-8x7B decode: 34.4% on the shipped "
                  f"sample, 37.5% on routing-realism.md's four sequences)\n"
                  f"[bold]distance to real routing[/]: {distance} (largest relative error of the reuse and of "
                  f"per-layer LRU/Belady hit rates at 1/4, 1/2, 3/4 of the experts, python -m traces.stats)")
    # metrics hold each GPU's budget (budget_scope=total split the given figure evenly before)
    per_gpu = "" if m.gpus == 1 else f" per GPU, {format_bytes(m.budget_bytes * m.gpus)} in all on {m.gpus} GPUs"
    table = Table(title=f"{m.policy} | budget {format_bytes(m.budget_bytes)} ({m.budget_experts:.1f} experts){per_gpu} | "
                        f"{m.model} ({m.policy_info.get('expert_format', 'bf16')} experts) on {m.hardware}")
    for column in ("metric", "value"):
        table.add_column(column)
    rows = [
        ("requests / steps", f"{m.requests} / {m.steps}"),
        ("expert hit rate", f"{m.hit_rate:.2%}"),
        ("  demand hits / prefetch hits", f"{m.demand_hit_rate:.2%} / {m.prefetch_hit_rate:.2%}"),
        ("  late prefetches / misses", f"{m.late_prefetch_rate:.2%} / {m.miss_rate:.2%}"),
        ("TTFT mean / p99 (ms)", f"{_ms(m.ttft_mean_s)} / {_ms(m.ttft_p99_s)}"
         + ("" if m.ttft_prefill == "recorded" else " (prefill left out: not recorded in the trace)")),
        ("TPOT mean / p50 / p99 (ms)", f"{_ms(m.tpot_mean_s)} / {_ms(m.tpot_p50_s)} / {_ms(m.tpot_p99_s)}"),
        ("end-to-end mean (ms)", _ms(m.e2e_mean_s)),
        ("host->GPU bytes (wasted prefetch)", f"{format_bytes(m.bytes_h2d)} ({format_bytes(m.wasted_prefetch_bytes)})"),
        ("stall on copies (s)", f"{m.stall_s:.3f}"),
        ("GPU expert memory high-water", format_bytes(m.gpu_mem_high_water_bytes)),
        ("throughput (output tokens/s)", f"{m.throughput_tokens_per_s:.2f}"),
        ("simulated / wall time (s)", f"{m.makespan_s:.3f} / {result.wall_s:.2f}"),
    ]
    load = open_loop_load(result.per_request, result.config["arrival"], result.config["rate_rps"])
    if load is not None:
        rows.append(("offered load / capacity (requests/s)",
                     f"{load.offered_rps:.3g} / {load.capacity_rps:.3g} ({load.utilisation:.0%})"))
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    trained = m.policy_info.get("train_requests")
    if trained:
        console.print(f"[yellow]note[/]: the trace's first {trained} requests trained {m.policy} offline and are "
                      f"not measured (train_fraction={result.config['train_fraction']:g}; unset, a policy that learns "
                      f"offline takes {DEFAULT_TRAIN_FRACTION:g})")
    if load is not None and load.warning():
        console.print(f"[bold red]warning[/]: {load.warning()}")
    host = m.policy_info.get("policy_host_s")
    if host:
        whose = f"{host['same_as']}'s, as {m.policy}'s was not measured" if "same_as" in host else "measured"
        console.print(f"[yellow]note[/]: hardware '{m.hardware}' charges {m.policy}'s decisions "
                      f"{host['layer_s'] * 1e6:.1f} us of host time per layer and {host['step_s'] * 1e6:.1f} us per "
                      f"pass (policy_host_s: {whose} by realrun.calibrate on one trace)")
    if m.policy_info.get("policy_host_uncharged"):
        console.print(f"[yellow]note[/]: {m.policy}'s decisions are charged no host time "
                      f"({m.policy_info['policy_host_uncharged']})")
    estimated = m.policy_info.get("compute_estimated")
    if estimated:
        console.print(f"[yellow]note[/]: {', '.join(estimated)} estimated by roofline: hardware '{m.hardware}' "
                      f"has no measured table for {m.model}")
    if m.policy_info.get("dequant_uncharged"):
        console.print(f"[yellow]note[/]: dequantising {m.policy_info['dequant_uncharged']} experts is charged 0 s: "
                      f"hardware '{m.hardware}' has no dequant_s_per_expert for it")
    if m.ttft_prefill != "recorded":
        console.print("[yellow]note[/]: the trace did not record the prompts' routing: TTFT leaves out the prefill "
                      "(no prefill pass is simulated; TTFT ends at the first decode step)")
