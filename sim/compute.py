"""Compute times of one model on one hardware profile, memoised by token count (the hot path)."""
from __future__ import annotations

from sim.profiles import HardwareProfile
from traces import ModelSpec


class ComputeModel:
    def __init__(self, hardware: HardwareProfile, model: ModelSpec):
        self.hardware = hardware
        self.model = model
        self._expert: dict[int, float] = {}
        self._non_expert: dict[int, float] = {}

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
