"""How long each policy's decisions take on this host: the simulator's policy_host_s.

The executor calls a policy's hooks on the critical path: the GPU has finished the router (or the
token) and waits while the host decides. For the matching policies that is ~0.1 ms per layer, as
much as a decode layer's compute, and it grows with what they match against (layers, training
requests). So it is measured here, on the machine that runs realrun, by replaying a trace in the
simulator with every hook call timed; the mean per call is written to the profile (a policy's
occasional expensive call counts, as it does on the critical path).
"""
from __future__ import annotations

import time
from typing import Callable

from tqdm import tqdm

from policies import available
from sim.api import execute, prepare
from sim.config import SimConfig
from sim.profiles import HardwareProfile, PolicyHostTime
from traces import Trace

HOOKS = ("on_layer_start", "on_step_start", "on_step_end")


def _timed(hook: Callable, spent: list[float]) -> Callable:
    def call(*args, **kwargs):
        started = time.perf_counter()
        result = hook(*args, **kwargs)
        spent.append(time.perf_counter() - started)
        return result
    return call


def hook_times(trace: Trace, policy: str, budget: str, hardware: HardwareProfile,
               train_fraction: float = 0.0) -> PolicyHostTime:
    """Mean seconds per on_layer_start call, and per pass in on_step_start plus on_step_end."""
    run = prepare(SimConfig(trace=str(trace.path), policy=policy, budget=budget, hardware=hardware.to_dict(),
                            train_fraction=train_fraction), trace)
    spent: dict[str, list[float]] = {name: [] for name in HOOKS}
    for name in HOOKS:
        setattr(run.policy, name, _timed(getattr(run.policy, name), spent[name]))
    execute(run)

    def mean(name: str) -> float:
        return sum(spent[name]) / max(1, len(spent[name]))
    return PolicyHostTime(mean("on_layer_start"), mean("on_step_start") + mean("on_step_end"))


def policy_host_times(trace: Trace, hardware: HardwareProfile, train_fraction: float = 0.0,
                      policies: list[str] | None = None) -> dict[str, PolicyHostTime]:
    """Every registered policy (or `policies`) at half of all experts."""
    names = policies or [p for p in available() if not p.startswith("test_")]
    budget = f"{trace.model.num_layers * trace.model.num_experts // 2}experts"
    return {name: hook_times(trace, name, budget, hardware, train_fraction)
            for name in tqdm(names, desc="policy host time", unit="policy", leave=False)}
