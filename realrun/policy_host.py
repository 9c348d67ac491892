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
"""
from __future__ import annotations

from collections import defaultdict

from tqdm import tqdm

from policies import policy_class, shipped
from sim.api import execute, prepare
from sim.config import SimConfig
from sim.layer_protocol import POLICY_HOOKS
from sim.profiles import HardwareProfile, PolicyHostTime
from traces import Trace

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


def host_times(trace: Trace, policy: str, budget: str, hardware: HardwareProfile,
               train_fraction: float = 0.0, max_requests: int | None = None) -> tuple[PolicyHostTime, PolicyHostTime]:
    """(the hooks alone, the hooks and carrying their decisions out): mean seconds per layer, per pass."""
    run = prepare(SimConfig(trace=str(trace.path), policy=policy, budget=budget, hardware=hardware.to_dict(),
                            train_fraction=train_fraction, max_requests=max_requests, engine="simpy"), trace)
    spent: dict[str, list[float]] = defaultdict(list)
    execute(run, observer=lambda call, seconds: spent[call].append(seconds))
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

    def beyond(name: str, share: float) -> tuple[float, float, float]:
        own, base = measured[name, share][1], measured[BASELINE, share][1]
        return (max(0.0, own.layer_s - base.layer_s), max(0.0, own.step_s - base.step_s),
                max(0.0, own.land_s - measured[LAND_BASELINE, share][1].land_s))
    charged = {name: PolicyHostTime(*beyond(name, 0.5), by_budget=tuple((share, *beyond(name, share)) for share in SHARES))
               for name in names}
    return charged, {name: measured[name, 0.5][0] for name in names}
