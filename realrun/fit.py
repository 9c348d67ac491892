"""Terms taken from the executor's own runs: a decode layer's time, and the after-wait slowdown.

calibrate measures a one-token decode layer on a loop of a few layers and the after-wait response
on launch groups after scripted waits; on a busy host their rounds spread by 20-120% and the
validation's all_resident and lru runs (realrun.validate) stay off by 5-8% after re-measuring. The
executor's run of all_resident *is* the decode layer at the run's duty cycle, and lru's is the work
after copy waits of the lengths a run sees. So a term still off after its re-measures is solved
for: the one scale of it (the one-token layer times; the slowdown beyond 1) whose simulation of
the check's run gives the measured mean TPOT. Torch-free: the profile in, the profile out.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from sim.profiles import HardwareProfile, TimeTable
from traces import ModelSpec

ITERATIONS = 16  # bisection: 2^-16 of the range, a few simulated runs a term


def decode_scaled(profile: HardwareProfile, model: ModelSpec, factor: float) -> HardwareProfile:
    """The one-token non-expert and expert times of `model` scaled by `factor` (a decode layer's time)."""
    def one_token(table: TimeTable) -> TimeTable:
        return dataclasses.replace(table, seconds=tuple(s * factor if t == 1 else s
                                                        for t, s in zip(table.tokens, table.seconds)))
    expert, non_expert = dict(profile.expert_time_s), dict(profile.non_expert_layer_time_s)
    expert[model.expert_shape_key] = one_token(expert[model.expert_shape_key])
    non_expert[model.name] = one_token(non_expert[model.name])
    return dataclasses.replace(profile, expert_time_s=expert, non_expert_layer_time_s=non_expert)


def after_wait_scaled(profile: HardwareProfile, model: ModelSpec, factor: float) -> HardwareProfile:
    """The after-wait slowdown beyond 1 (cold_factor - 1) of `model` scaled by `factor`."""
    def scaled(spec):
        return dataclasses.replace(spec, cold_factor=1 + (spec.cold_factor - 1) * factor)
    terms = profile.per_model.get(model.name)
    if terms is not None and terms.after_wait is not None:
        return dataclasses.replace(profile, per_model={**profile.per_model, model.name: dataclasses.replace(
            terms, after_wait=scaled(terms.after_wait))})
    if profile.after_wait is None:
        raise ValueError(f"profile '{profile.name}' has no after-wait term to scale")
    return dataclasses.replace(profile, after_wait=scaled(profile.after_wait))


# term -> (the scaler, the scales searched): a decode layer more than 3x off is a broken measurement,
# not one to paper over; the slowdown may vanish (0: work after a wait as fast as warm work).
SCALERS: dict[str, tuple[Callable[[HardwareProfile, ModelSpec, float], HardwareProfile], tuple[float, float]]] = {
    "decode_layer": (decode_scaled, (1 / 3, 3.0)), "after_wait": (after_wait_scaled, (0.0, 3.0))}


def solve(simulated: Callable[[float], float], target: float, bounds: tuple[float, float]) -> float:
    """The scale within `bounds` whose simulated mean TPOT (increasing in the scale) is `target`;
    the bound nearest to it when none is."""
    lo, hi = bounds
    if simulated(lo) >= target:
        return lo
    if simulated(hi) <= target:
        return hi
    for _ in range(ITERATIONS):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if simulated(mid) < target else (lo, mid)
    return (lo + hi) / 2
