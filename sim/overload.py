"""Offered load against capacity, for open-loop runs: is the queue of waiting requests bounded?

An open loop (arrival=poisson or trace) offers requests at a rate of its own; when that exceeds what
the modelled system serves, waiting grows with every request and TTFT measures the queue, not the
system. The capacity is measured from the run itself: requests served per second while the system
had requests in service (the union of their service intervals), the same batching and copies.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

UNBOUNDED_UTILISATION = 1.0  # offered above capacity: the queue grows for as long as requests arrive
GROWTH = 2.0  # ... and the waits of the run's last third exceed its first third's this many times


@dataclass(frozen=True)
class Load:
    offered_rps: float
    capacity_rps: float
    first_wait_s: float  # mean time from arrival to admission, the first third of the requests
    last_wait_s: float  # ... the last third

    @property
    def utilisation(self) -> float:
        return self.offered_rps / self.capacity_rps

    @property
    def unbounded(self) -> bool:
        return self.utilisation > UNBOUNDED_UTILISATION and self.last_wait_s > GROWTH * max(self.first_wait_s, 1e-9)

    def warning(self) -> str | None:
        if not self.unbounded:
            return None
        return (f"offered load {self.offered_rps:.3g} requests/s is {self.utilisation:.1f}x the capacity measured in "
                f"this run ({self.capacity_rps:.3g}/s): the queue grows without bound (mean wait before admission "
                f"{self.first_wait_s:.1f} s for the first third of the requests, {self.last_wait_s:.1f} s for the "
                f"last), so TTFT measures the queue; use rate_rps below {self.capacity_rps:.2g}, or sim.load for "
                "latency against load")


def busy_seconds(start: np.ndarray, end: np.ndarray) -> float:
    """Length of the union of the intervals [start, end)."""
    total, reach = 0.0, -np.inf
    for s, e in sorted(zip(start, end)):
        if e <= reach:
            continue
        total += e - max(s, reach)
        reach = e
    return total


def open_loop_load(per_request: pd.DataFrame, arrival: str, rate_rps: float) -> Load | None:
    """None for a closed loop (its clients wait for each answer: no queue of its own), or too few requests."""
    if arrival == "closed" or len(per_request) < 3:
        return None
    arrivals = per_request["arrival_s"].to_numpy(float)
    order = np.argsort(arrivals, kind="stable")
    wait = (per_request["start_s"].to_numpy(float) - arrivals)[order]
    if arrival == "poisson":
        offered = rate_rps
    else:
        span = arrivals.max() - arrivals.min()
        offered = (len(arrivals) - 1) / span if span > 0 else np.inf
    busy = busy_seconds(per_request["start_s"].to_numpy(float), per_request["end_s"].to_numpy(float))
    third = len(wait) // 3
    return Load(float(offered), len(per_request) / busy, float(wait[:third].mean()), float(wait[-third:].mean()))
