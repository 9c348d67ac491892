"""sim.schedule's array view of the passes (step_table, replay_uses) against walking request_passes,
and the replay's future built from it."""
from __future__ import annotations

import numpy as np
import pytest

from sim.future import ReplayFuture
from sim.schedule import replay_uses, request_passes
from traces.defaults import resolve_trace, shipped_traces
from traces.shared import shared_trace


def walked(trace, requests):
    """The steps and expert uses as the passes give them, one by one."""
    L, E = trace.model.num_layers, trace.model.num_experts
    request, row, block, pos, experts = [], [], [], [], []
    for r in requests:
        for spec in request_passes(trace, r):
            step = len(row)
            request.append(r)
            row.append(-1 if spec.kind == "prefill" else int(spec.rows[0]))
            experts.append(spec.experts)
            for layer, chosen in enumerate(spec.experts):
                block.extend(layer * E + e for e in chosen)
                pos.extend([step * L + layer] * len(chosen))
    order = np.lexsort((pos, block))
    return request, row, np.asarray(block)[order], np.asarray(pos)[order], experts


@pytest.mark.parametrize("trace", shipped_traces())
def test_arrays_match_the_passes(trace):
    t = shared_trace(resolve_trace(trace))
    requests = list(range(min(12, t.num_requests)))[::-1]
    request, row, block, pos, experts = walked(t, requests)
    steps, b, p = replay_uses(t, requests)
    assert steps.request.tolist() == request and steps.row.tolist() == row
    np.testing.assert_array_equal(b, block)
    np.testing.assert_array_equal(p, pos)
    future = ReplayFuture(t, requests)
    assert future.num_steps == len(row)
    for step in (0, len(row) // 2, len(row) - 1):
        assert future.step_experts(step) == experts[step]
    L, E = t.model.num_layers, t.model.num_experts
    for layer in range(L):
        for e in range(E):
            np.testing.assert_array_equal(future.uses_of(layer, e), pos[block == layer * E + e])
