"""The replay's future, for the policies that may read it (Belady, oracle prefetch) and no other.

Positions count layer-iterations in replay order: position = step * num_layers + layer, with the
steps numbered as the engine runs them (sim.schedule.request_passes, request after request). Built
from the trace arrays with numpy (sim.schedule.replay_uses), without walking the passes.
"""
from __future__ import annotations

import numpy as np

from sim.schedule import replay_uses
from traces import Trace


class ReplayFuture:
    def __init__(self, trace: Trace, requests: list[int]):
        L, E = trace.model.num_layers, trace.model.num_experts
        self.num_layers = L
        self._trace = trace
        self._steps, block, self.block_uses = replay_uses(trace, requests)
        # block b's use positions: block_uses[uses_ptr[b]:uses_ptr[b + 1]], ascending
        self.uses_ptr = np.concatenate([[0], np.cumsum(np.bincount(block, minlength=L * E))]).astype(np.int64)
        self._E = E

    @property
    def num_steps(self) -> int:
        return len(self._steps.row)

    def position(self, step: int, layer: int) -> int:
        return step * self.num_layers + layer

    def step_experts(self, step: int) -> list[tuple[int, ...]]:
        """Experts each layer of a step will need (as request_passes gives them)."""
        row = int(self._steps.row[step])
        if row >= 0:
            return [tuple(e) for e in self._trace.experts[row].tolist()]
        counts = self._trace.prefill_counts[int(self._steps.request[step])]
        return [tuple(int(e) for e in np.flatnonzero(c)) for c in counts]

    def uses_of(self, layer: int, expert: int) -> np.ndarray:
        """Sorted positions at which (layer, expert) is needed."""
        b = layer * self._E + expert
        return self.block_uses[self.uses_ptr[b]:self.uses_ptr[b + 1]]

    def next_use(self, layer: int, expert: int, after: int) -> float:
        """First position > after at which (layer, expert) is needed; inf if never."""
        uses = self.uses_of(layer, expert)
        i = int(np.searchsorted(uses, after, side="right"))
        return float(uses[i]) if i < len(uses) else float("inf")
