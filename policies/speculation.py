"""Next-layer guesses for the speculative schemes (Mixtral-Offloading, MoEpic).

Mixtral-Offloading applies layer l+1's router to layer l's hidden state and prefetches the top
guesses; a trace carries exactly those gates as `lookahead` when it was collected with them. A
trace without them falls back to the experts the previous token chose at layer l+1.
"""
from __future__ import annotations

from policies.base import Step


class NextLayerGuess:
    def __init__(self, num_layers: int, num_experts: int):
        self.num_experts = num_experts
        self.previous: list[tuple[int, ...]] = [()] * num_layers  # last pass's experts per layer
        self.source = "previous token"

    def observe(self, layer: int, experts: tuple[int, ...]) -> None:
        self.previous[layer] = experts

    def guess(self, step: Step, layer: int, width: int) -> list[int]:
        """Up to `width` experts for layer + 1, most likely first."""
        gates = step.lookahead(layer) if step.lookahead is not None else None
        if gates is not None and gates.shape[1] >= 1:
            self.source = "lookahead gates"
            scores = gates[:, 0, :].sum(axis=0)
            return (-scores).argsort(kind="stable")[:width].tolist()
        return list(self.previous[layer + 1][:width])
