"""Compute times of one model on one hardware profile, memoised by token count (the hot path),
and the GPUs' clock state where the profile models it (sim.profiles.ClockSpec)."""
from __future__ import annotations

from sim.profiles import HardwareProfile
from traces import ModelSpec


class ComputeModel:
    def __init__(self, hardware: HardwareProfile, model: ModelSpec):
        self.hardware = hardware
        self.model = model
        self.clock = hardware.clock
        self._expert: dict[int, float] = {}
        self._non_expert: dict[int, float] = {}
        self._heat: dict[int, float] = {}  # per GPU, 0 cold .. 1 hot; a run starts cold (loading idles it)
        self._busy_until: dict[int, float] = {}

    def expert_time(self, tokens: int) -> float:
        seconds = self._expert.get(tokens)
        if seconds is None:
            seconds = self._expert[tokens] = self.hardware.expert_time(self.model, tokens)
        return seconds

    def non_expert_time(self, tokens: int) -> float:
        seconds = self._non_expert.get(tokens)
        if seconds is None:
            seconds = self._non_expert[tokens] = self.hardware.non_expert_time(self.model, tokens)
        return seconds

    def run(self, gpu: int, now: float, seconds: float) -> float:
        """How long `seconds` of work (at hot clocks, as the tables give it) takes on a GPU from `now`."""
        clock = self.clock
        if clock is None:
            return seconds
        heat = self._heat.get(gpu, 0.0)
        idle = now - self._busy_until.get(gpu, 0.0)
        if idle > 0:
            heat = max(0.0, heat - idle / clock.cool_down_s)
        wall = seconds * (1.0 + (clock.cold_factor - 1.0) * (1.0 - heat))
        self._heat[gpu] = min(1.0, heat + wall / clock.warm_up_s)
        self._busy_until[gpu] = now + wall
        return wall
