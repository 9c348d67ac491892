"""All experts resident on the GPU from the start, no copies: the latency floor. Ignores the budget."""
from __future__ import annotations

from policies.base import Policy
from policies.registry import register


@register("all_resident")
class AllResident(Policy):
    ignores_budget = True
    fast_path = "resident"  # nothing is ever copied: sim.fast runs it
