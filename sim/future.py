"""The replay's future, for the policies that may read it (Belady, oracle prefetch) and no other.

Positions count layer-iterations in replay order: position = step * num_layers + layer, with the
steps numbered as the engine runs them (sim.schedule.request_passes, request after request).
"""
from __future__ import annotations

import numpy as np

from sim.schedule import request_passes
from traces import Trace


class ReplayFuture:
    def __init__(self, trace: Trace, requests: list[int]):
        layers = trace.model.num_layers
        self.num_layers = layers
        step_experts = [spec.experts for r in requests for spec in request_passes(trace, r)]
        self._steps = step_experts
        by_block: dict[tuple[int, int], list[int]] = {}
        for step, per_layer in enumerate(step_experts):
            base = step * layers
            for layer, experts in enumerate(per_layer):
                for e in experts:
                    by_block.setdefault((layer, e), []).append(base + layer)
        self._uses = {key: np.asarray(positions, dtype=np.int64) for key, positions in by_block.items()}
        self._never = np.zeros(0, dtype=np.int64)

    @property
    def num_steps(self) -> int:
        return len(self._steps)

    def position(self, step: int, layer: int) -> int:
        return step * self.num_layers + layer

    def step_experts(self, step: int) -> list[tuple[int, ...]]:
        """Experts each layer of a step will need."""
        return self._steps[step]

    def uses_of(self, layer: int, expert: int) -> np.ndarray:
        """Sorted positions at which (layer, expert) is needed."""
        return self._uses.get((layer, expert), self._never)

    def next_use(self, layer: int, expert: int, after: int) -> float:
        """First position > after at which (layer, expert) is needed; inf if never."""
        uses = self.uses_of(layer, expert)
        i = int(np.searchsorted(uses, after, side="right"))
        return float(uses[i]) if i < len(uses) else float("inf")
