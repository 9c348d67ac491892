"""What a run records while it runs (Recorder), and the summary computed after it (RunMetrics).

The engines only record; summarising, formatting and writing happen here and in sim.report.

Definitions:
- An expert use is one expert needed by one layer in one forward pass (a prefill pass needs the
  union of its tokens' experts). A use is a hit when every part of the expert is resident when the
  layer's router has run; a prefetch hit when it is resident thanks to a prefetch not used before;
  a late prefetch when its copy is queued or on the link at that moment; otherwise a miss.
- TTFT: arrival to the end of the first forward pass of the request (its prefill; for decode-only
  traces, its first recorded decode step: ttft_prefill says "left out" then). TPOT: time between consecutive output tokens, one
  sample per later decode step; tpot_*_s are over all samples of the run.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd


class Recorder:
    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        zeros = [0] * num_layers
        self.uses = list(zeros)
        self.hits = list(zeros)
        self.prefetch_hits = list(zeros)
        self.late = list(zeros)
        self.misses = list(zeros)
        self.stall_s = [0.0] * num_layers
        self.cpu_uses = list(zeros)  # experts computed on the host CPU (sim.host_cpu); uses and misses too
        self.cpu_busy_s = 0.0
        self.activation_bytes = 0.0  # hidden states down and results up the host link, for CPU experts
        self.tier: dict[str, float] = {}  # the disk tier's summary (sim.disk.HostTier), when on
        self.layer_bytes = [0.0] * num_layers
        self.demand_bytes = 0.0
        self.prefetch_bytes = 0.0
        self.peer_bytes = 0.0
        self.prefetches_requested = 0
        self.prefetches_dropped = 0
        self.prefetches_cancelled = 0
        self.steps = 0
        self.layer_iterations = 0
        self.token_latencies: list[float] = []
        self.requests: list[dict[str, Any]] = []

    def copied(self, layer: int, nbytes: float, demand: bool, peer: bool = False) -> None:
        """Bytes landed in a GPU's cache: from host memory, or from an NVLink peer (peer=True)."""
        if peer:
            self.peer_bytes += nbytes
            return
        self.layer_bytes[layer] += nbytes
        if demand:
            self.demand_bytes += nbytes
        else:
            self.prefetch_bytes += nbytes


def _stats(values: list[float] | np.ndarray, prefix: str) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        return {f"{prefix}_{name}_s": float("nan") for name in ("mean", "p50", "p90", "p99")}
    p50, p90, p99 = np.percentile(array, [50, 90, 99])
    return {f"{prefix}_mean_s": float(array.mean()), f"{prefix}_p50_s": float(p50),
            f"{prefix}_p90_s": float(p90), f"{prefix}_p99_s": float(p99)}


@dataclass
class RunMetrics:
    """The figures of one run; metrics.json holds exactly these keys."""

    policy: str
    trace: str
    trace_origin: str
    model: str
    hardware: str
    gpus: int
    budget_bytes: int  # per GPU
    budget_experts: float  # per GPU
    requests: int
    steps: int
    layer_iterations: int
    expert_uses: int
    hit_rate: float
    demand_hit_rate: float
    prefetch_hit_rate: float
    late_prefetch_rate: float
    miss_rate: float
    ttft_mean_s: float
    ttft_p50_s: float
    ttft_p90_s: float
    ttft_p99_s: float
    tpot_mean_s: float
    tpot_p50_s: float
    tpot_p90_s: float
    tpot_p99_s: float
    e2e_mean_s: float
    e2e_p50_s: float
    e2e_p90_s: float
    e2e_p99_s: float
    bytes_h2d: float
    bytes_nvlink: float
    demand_bytes_h2d: float
    prefetch_bytes_h2d: float
    wasted_prefetch_bytes: float
    prefetches_requested: int
    prefetches_dropped: int
    prefetches_cancelled: int
    evictions: int
    stall_s: float
    makespan_s: float
    throughput_tokens_per_s: float
    gpu_mem_high_water_bytes: int  # of the fullest GPU's expert cache
    trace_token_reuse: float | None = None
    trace_distance_to_real: float | None = None  # traces.stats: relative error of reuse and LRU/Belady vs real
    seed: int = 0
    # What TTFT holds of the prompt: "recorded" (the trace's prefill routing is simulated) or
    # "left out" (a decode-only trace: no prefill expert work, TTFT ends at the first decode step).
    ttft_prefill: str = "recorded"
    policy_info: dict[str, Any] = field(default_factory=dict)
    # Hybrid execution and tiers (zero when off): experts computed on the host CPU, the activations
    # they moved over the host link (both directions), and where copies to the GPU came from.
    cpu_expert_uses: int = 0
    cpu_rate: float = 0.0  # CPU expert uses / expert uses (a CPU use counts as a miss: not on the GPU)
    cpu_busy_s: float = 0.0
    bytes_activations: float = 0.0
    ram_hits: int = 0  # expert reads host RAM served (copies to the GPU and CPU computes)
    disk_reads: int = 0  # expert reads from the drive (RAM did not hold them)
    bytes_disk: float = 0.0
    disk_wait_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(rec: Recorder, *, policy: str, trace: str, trace_origin: str, model: str, hardware: str, gpus: int,
              budget_bytes: int, bytes_per_expert: int, high_water_bytes: int, evictions: int,
              wasted_prefetch_bytes: float, makespan_s: float, seed: int, trace_token_reuse: float | None,
              trace_distance_to_real: float | None = None, ttft_prefill: str = "recorded",
              policy_info: dict[str, Any]) -> tuple[RunMetrics, pd.DataFrame, pd.DataFrame]:
    per_request = pd.DataFrame(rec.requests, columns=[
        "request_id", "prompt_tokens", "output_tokens", "arrival_s", "start_s", "first_token_s", "end_s"])
    per_request["ttft_s"] = per_request["first_token_s"] - per_request["arrival_s"]
    per_request["e2e_s"] = per_request["end_s"] - per_request["arrival_s"]
    later_tokens = (per_request["output_tokens"] - 1).clip(lower=1)
    per_request["tpot_mean_s"] = (per_request["end_s"] - per_request["first_token_s"]) / later_tokens

    uses = np.asarray(rec.uses, dtype=np.int64)
    hits = np.asarray(rec.hits, dtype=np.int64)
    prefetch_hits = np.asarray(rec.prefetch_hits, dtype=np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_layer = pd.DataFrame({
            "layer": np.arange(rec.num_layers),
            "expert_uses": uses,
            "hits": hits,
            "demand_hits": hits - prefetch_hits,
            "prefetch_hits": prefetch_hits,
            "late_prefetches": np.asarray(rec.late, dtype=np.int64),
            "misses": np.asarray(rec.misses, dtype=np.int64),
            "hit_rate": hits / uses,
            "stall_s": np.asarray(rec.stall_s),
            "bytes_h2d": np.asarray(rec.layer_bytes),
        })
    total_uses = int(uses.sum())

    def rate(count: float) -> float:
        return float(count) / total_uses if total_uses else float("nan")

    tokens = int(per_request["output_tokens"].sum())
    metrics = RunMetrics(
        policy=policy, trace=trace, trace_origin=trace_origin, model=model, hardware=hardware, gpus=gpus,
        budget_bytes=int(budget_bytes), budget_experts=budget_bytes / bytes_per_expert,
        requests=len(per_request), steps=rec.steps, layer_iterations=rec.layer_iterations, expert_uses=total_uses,
        hit_rate=rate(hits.sum()), demand_hit_rate=rate(hits.sum() - prefetch_hits.sum()),
        prefetch_hit_rate=rate(prefetch_hits.sum()), late_prefetch_rate=rate(sum(rec.late)),
        miss_rate=rate(sum(rec.misses)),
        **_stats(per_request["ttft_s"].to_numpy(), "ttft"),
        **_stats(rec.token_latencies, "tpot"),
        **_stats(per_request["e2e_s"].to_numpy(), "e2e"),
        bytes_h2d=rec.demand_bytes + rec.prefetch_bytes, bytes_nvlink=rec.peer_bytes, demand_bytes_h2d=rec.demand_bytes,
        prefetch_bytes_h2d=rec.prefetch_bytes, wasted_prefetch_bytes=float(wasted_prefetch_bytes),
        prefetches_requested=rec.prefetches_requested, prefetches_dropped=rec.prefetches_dropped,
        prefetches_cancelled=rec.prefetches_cancelled, evictions=evictions, stall_s=float(sum(rec.stall_s)),
        makespan_s=makespan_s, throughput_tokens_per_s=tokens / makespan_s if makespan_s > 0 else float("nan"),
        gpu_mem_high_water_bytes=int(high_water_bytes), trace_token_reuse=trace_token_reuse,
        trace_distance_to_real=trace_distance_to_real, seed=seed, ttft_prefill=ttft_prefill,
        policy_info=policy_info,
        cpu_expert_uses=int(sum(rec.cpu_uses)),
        cpu_rate=sum(rec.cpu_uses) / total_uses if sum(rec.cpu_uses) else 0.0,
        cpu_busy_s=rec.cpu_busy_s, bytes_activations=rec.activation_bytes,
        ram_hits=int(rec.tier.get("ram_hits", 0)), disk_reads=int(rec.tier.get("disk_reads", 0)),
        bytes_disk=float(rec.tier.get("bytes_disk", 0.0)), disk_wait_s=float(rec.tier.get("disk_wait_s", 0.0)),
    )
    if sum(rec.cpu_uses):
        per_layer["cpu_expert_uses"] = np.asarray(rec.cpu_uses, dtype=np.int64)
    return metrics, per_request, per_layer
