"""Measuring in interleaved rounds, and re-measuring what disagrees with itself.

A machine's speed drifts over seconds to minutes (copy links, host clocks). Measured one quantity
after another, one quantity can catch a slow spell the others miss; measured in rounds (every
quantity once per round, the rounds one after another), every quantity samples the drift alike,
and a quantity whose rounds disagree shows it in its spread. Such a quantity is measured again, in
more rounds of its own (a bounded number), and its median over all its rounds is kept with its
spread, so a profile says how sure each of its numbers is. Torch-free: calibrate's probes are the
callables, a test's are scripted.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Callable

ROUNDS = 3
SPREAD_LIMIT = 0.03  # (max - min) / median of a quantity's rounds beyond which it is measured again
EXTRA_ROUNDS = 2  # rounds added each time a quantity is measured again
MAX_REMEASURES = 2


@dataclass
class Measured:
    """One quantity's rounds: its value is their median, its spread (max - min) / median."""

    values: list[float] = field(default_factory=list)
    remeasured: int = 0  # how many times more rounds were added

    @property
    def value(self) -> float:
        return statistics.median(self.values)

    @property
    def spread(self) -> float:
        middle = self.value
        return (max(self.values) - min(self.values)) / abs(middle) if middle else 0.0

    def settled(self, limit: float) -> bool:
        return self.spread <= limit

    def summary(self) -> dict:
        return {"value": self.value, "spread": self.spread, "rounds": len(self.values), "remeasured": self.remeasured}


def interleave(probes: dict[str, Callable[[], float]], rounds: int, into: dict[str, Measured] | None = None,
               on_round: Callable[[], None] | None = None) -> dict[str, Measured]:
    """Every probe once per round, in the same order each round, for `rounds` rounds."""
    found = into if into is not None else {}
    for name in probes:
        found.setdefault(name, Measured())
    for _ in range(rounds):
        for name, probe in probes.items():
            found[name].values.append(float(probe()))
        if on_round is not None:
            on_round()
    return found


def measure(probes: dict[str, Callable[[], float]], rounds: int = ROUNDS, spread_limit: float = SPREAD_LIMIT,
            extra_rounds: int = EXTRA_ROUNDS, max_remeasures: int = MAX_REMEASURES) -> dict[str, Measured]:
    """`rounds` interleaved rounds of every probe; then, up to `max_remeasures` times, `extra_rounds`
    more rounds of the quantities whose spread exceeds `spread_limit` (interleaved among themselves).
    A quantity still unsettled after that keeps its median and reports its spread."""
    found = interleave(probes, rounds)
    for _ in range(max_remeasures):
        unsettled = {name: probes[name] for name, m in found.items() if not m.settled(spread_limit)}
        if not unsettled:
            break
        interleave(unsettled, extra_rounds, into=found)
        for name in unsettled:
            found[name].remeasured += 1
    return found


def unsettled(found: dict[str, Measured], spread_limit: float = SPREAD_LIMIT) -> list[str]:
    return [name for name, m in found.items() if not m.settled(spread_limit)]
