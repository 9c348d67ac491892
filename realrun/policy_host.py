"""How long each policy's decisions take on this host: the simulator's policy_host_s.

The executor runs a policy on the critical path: the GPU has finished the router (or the token)
and waits while the host decides (the policy's hooks) and carries the decision out (the layer
protocol classifies the experts and queues their copies; a plan replaces the queued prefetches).
For the matching policies that is ~0.1-0.2 ms per layer, as much as a decode layer's compute, and
it grows with what they match against (layers, training requests). So it is measured here, on the
machine that runs realrun, by replaying a trace in the simulator, whose layer protocol and copy
queue are the executor's own code, with every such call timed (an observer of the engines' host
calls, sim.layer_protocol.HostCalls); the mean per layer and per pass is
written to the profile (a policy's occasional expensive call counts, as it does on the critical
path). all_resident's share is already in calibrate's executor host time (measured by running
it), so each policy is charged what it takes beyond all_resident's. Each landed copy is timed too
(its commit, the policy told, the next copy's victims ranked while the link waits), charged beyond
lru's, whose landings the copy calibration and lru's accurate runs already hold. All of it is
measured with the cache at several shares of the experts (SHARES): a policy ranking every resident
expert costs more the more the cache holds.

The replay times the host as the simulator's process runs it; the executor's thread runs the same
calls beside CUDA's launches, its copy polling and its driver threads, and was measured taking up to
4x as long per landing (gpt-oss-20b on an H200 host: FineMoE's 226 us against the replay's 55).
on_executor (calibrate --executor-host, off by default: on two H200s it brought the simulator no
closer) runs every policy on the executor too, briefly (the request just before the measured ones,
cut to EXECUTOR_TOKENS, at EXECUTOR_SHARE of the experts), with its calls timed as in the replay,
and scales the replay's times by what the executor took over what the replay took of that run.
"""
from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from policies import policy_class, shipped
from realrun.subset import held_out_head
from sim.api import PreparedRun, execute, prepare
from sim.config import SimConfig
from sim.layer_protocol import LAUNCH, POLICY_HOOKS, HostObserver
from sim.profiles import HardwareProfile, PolicyHostTime
from traces import Trace

# Runs a prepared run with every host call reported to the observer: the simulator's replay, or the executor.
Runner = Callable[[PreparedRun, HostObserver], object]

BASELINE = "all_resident"
# Landings: what the copies' own calibration (copy_dma_s, timed on a bare loop) lacks, beyond the
# simplest policy that copies: lru (its admission and bookkeeping are what lru's runs, accurate, paid).
LAND_BASELINE = "lru"
# The host's work per layer, and outside the layers (per request and per pass), that the GPU waits for;
# and per landed chunk, that the next copy waits for.
LAYER_CALLS = ("on_layer_start", "start_layer")
PASS_CALLS = ("on_request_start", "on_request_end", "on_step_start", "on_step_end", "apply_plan")
LAND_CALLS = ("chunk_landed",)
# The budgets measured, as shares of all experts: what a policy's host time costs grows with what its
# cache holds (a ranking over every resident expert), and a run is charged its own budget's.
SHARES = (0.125, 0.25, 0.5, 0.75)
# The executor's short runs: enough layers and landings for a mean (24 tokens of gpt-oss-20b: 576
# layers), few enough seconds for every policy in calibrate's call.
EXECUTOR_TOKENS = 24
EXECUTOR_SHARE = 0.5
# Below this (seconds, beyond the baseline, in the replay of the short run) a ratio is noise: the
# executor's excess is added instead.
RATIO_FLOOR_S = 5e-6


def _replay(run: PreparedRun, observer: HostObserver) -> None:
    execute(run, observer=observer)


class _Spent:
    """An observer: each host call's seconds, less the copy launches made inside it (the executor's
    cudaMemcpyAsync and its event, up to ~0.2 ms on a busy host: part of the copy's own calibrated
    time, not the decision's). Launches outside any call (a demand started by an unpin) are dropped."""

    def __init__(self):
        self.calls: dict[str, list[float]] = defaultdict(list)
        self._launches: list[tuple[float, float]] = []  # (started, seconds)

    def __call__(self, call: str, seconds: float) -> None:
        now = time.perf_counter()
        if call == LAUNCH:
            self._launches.append((now - seconds, seconds))
            return
        began = now - seconds
        self.calls[call].append(seconds - sum(s for started, s in self._launches if started >= began))
        self._launches.clear()


def host_times(trace: Trace, policy: str, budget: str, hardware: HardwareProfile,
               train_fraction: float = 0.0, max_requests: int | None = None, runner: Runner = _replay,
               expert_format: str | None = None) -> tuple[PolicyHostTime, PolicyHostTime]:
    """(the hooks alone, the hooks and carrying their decisions out): mean seconds per layer, per pass."""
    run = prepare(SimConfig(trace=str(trace.path), policy=policy, budget=budget, hardware=hardware.to_dict(),
                            train_fraction=train_fraction, max_requests=max_requests, engine="simpy",
                            expert_format=expert_format), trace)
    timed = _Spent()
    runner(run, timed)
    spent = timed.calls
    layers, passes = max(1, len(spent["on_layer_start"])), max(1, len(spent["on_step_start"]))
    landings = max(1, len(spent["chunk_landed"]))

    def per(calls, count: int, hooks_only: bool) -> float:
        return sum(sum(spent[name]) for name in calls if name in POLICY_HOOKS or not hooks_only) / count
    return (PolicyHostTime(per(LAYER_CALLS, layers, True), per(PASS_CALLS, passes, True)),
            PolicyHostTime(per(LAYER_CALLS, layers, False), per(PASS_CALLS, passes, False),
                           per(LAND_CALLS, landings, False)))


def policy_host_times(trace: Trace, hardware: HardwareProfile, train_fraction: float = 0.0,
                      policies: list[str] | None = None, max_requests: int | None = None) -> tuple[dict[str, PolicyHostTime], dict[str, PolicyHostTime]]:
    """Every registered policy (or `policies`) with caches holding each of SHARES of all experts:
    (what the simulator charges, the decisions carried out beyond all_resident's, per landing beyond
    lru's, by budget (PolicyHostTime.by_budget; the top-level times those at half); the hooks alone
    at half, for the record)."""
    # A policy that computes on the host CPU needs the profile's cpu section, which calibrate does not
    # measure (realrun.calibrate.cpu_expert_section does, on its own).
    names = policies or [p for p in shipped() if hardware.cpu is not None or not policy_class(p).uses_cpu]
    total = trace.model.num_layers * trace.model.num_experts
    every = sorted({*names, BASELINE, LAND_BASELINE})
    runs = [(name, share) for share in SHARES for name in every]
    measured = {(name, share): host_times(trace, name, f"{max(1, round(total * share))}experts", hardware,
                                          train_fraction, max_requests)
                for name, share in tqdm(runs, desc="policy host time", unit="run", leave=False)}

    charged = {name: PolicyHostTime(*_beyond(measured, name, 0.5),
                                    by_budget=tuple((share, *_beyond(measured, name, share)) for share in SHARES))
               for name in names}
    return charged, {name: measured[name, 0.5][0] for name in names}


def _beyond(measured: dict, name: str, key) -> tuple[float, float, float]:
    """A policy's (layer, pass, landing) times beyond the baselines', measured[name, key][1] each."""
    own, base, land = measured[name, key][1], measured[BASELINE, key][1], measured[LAND_BASELINE, key][1]
    return (max(0.0, own.layer_s - base.layer_s), max(0.0, own.step_s - base.step_s),
            max(0.0, own.land_s - land.land_s))


def on_executor(charged: dict[str, PolicyHostTime], trace: Trace, hardware: HardwareProfile, train_fraction: float,
                run_real: Runner, expert_format: str, work_dir: Path, run_sim: Runner = _replay
                ) -> tuple[dict[str, PolicyHostTime], dict]:
    """`charged` (policy_host_times'), scaled to what the executor takes: each policy run briefly on
    it and in the replay alike, on the request just before the ones replayed at `train_fraction`
    (never a measured one), cut to EXECUTOR_TOKENS, at EXECUTOR_SHARE.
    Returns (the scaled times, per policy the short runs' (layer, pass, landing) seconds beyond the
    baselines on each side and the factors applied)."""
    short, fraction, request = held_out_head(trace, train_fraction, EXECUTOR_TOKENS, work_dir)
    budget = f"{max(1, round(trace.model.num_layers * trace.model.num_experts * EXECUTOR_SHARE))}experts"
    every = sorted({*charged, BASELINE, LAND_BASELINE})
    runs = [(name, side) for name in every for side in ("replay", "executor")]
    measured = {(name, side): host_times(short, name, budget, hardware, fraction, 1,
                                         run_sim if side == "replay" else run_real, expert_format)
                for name, side in tqdm(runs, desc="policy host time, executor", unit="run", leave=False)}
    record, scaled = {}, {}
    for name, times in charged.items():
        sim, real = _beyond(measured, name, "replay"), _beyond(measured, name, "executor")
        scale = [_scale(s, r) for s, r in zip(sim, real)]
        record[name] = {"replay_s": list(sim), "executor_s": list(real), "scale": [list(f) for f in scale]}
        scaled[name] = _scaled(times, scale)
    return scaled, {"request": request, "tokens": EXECUTOR_TOKENS, "share": EXECUTOR_SHARE, "policies": record}


def _scale(sim: float, real: float) -> tuple[float, float]:
    """(factor, added seconds) taking a replay's time to the executor's."""
    return (real / sim, 0.0) if sim >= RATIO_FLOOR_S else (1.0, real - sim)


def _scaled(times: PolicyHostTime, scale: list[tuple[float, float]]) -> PolicyHostTime:
    def apply(values) -> tuple[float, ...]:
        return tuple(max(0.0, v * factor + added) for v, (factor, added) in zip(values, scale))
    return dataclasses.replace(times, **dict(zip(("layer_s", "step_s", "land_s"),
                                                 apply((times.layer_s, times.step_s, times.land_s)))),
                               by_budget=tuple((row[0], *apply(row[1:])) for row in times.by_budget))
