"""Run a prepared run (sim.api.prepare) on real devices: execute_real(run, machine) -> RunResult.

The result has the simulator's RunMetrics, per-request and per-layer tables, so comparing the two
is a join; its policy_info["realrun"] says what ran (device, host buffers, layers).
"""
from __future__ import annotations

import time
from typing import Callable

from realrun.executor import Executor, Machine, Timeline
from sim.api import PreparedRun, RunResult, replay_options, run_result
from sim.budget import format_bytes
from sim.layer_protocol import HostObserver
from sim.placement import slides


def execute_real(run: PreparedRun, machine: Machine, on_request_done: Callable[[int], None] | None = None,
                 notes: list[str] | None = None, timeline: Timeline | None = None,
                 observer: HostObserver | None = None) -> RunResult:
    """`timeline`, when given, is filled with the run's kernel groups and waits (Timeline.frame());
    `observer` is told every host call's duration (as sim.api.execute tells it)."""
    started = time.perf_counter()
    executor = Executor(machine, run.trace, run.policy, run.model, run.hardware, run.budget_bytes, run.replay,
                        replay_options(run.cfg), on_request_done, timeline, observer)
    executor.prepare(run.train)
    state = executor.run()
    wall = time.perf_counter() - started
    notes = machine.notes() + list(notes or [])
    compactions, moved = slides(executor.caches)
    if compactions:
        notes.append(f"unequal expert parts fragmented the cache {compactions} times: {format_bytes(moved)} moved on "
                     "the GPU to join the gaps")
    executor.release()
    return run_result(run, state, wall, hardware_name=f"real: {machine.device_name}",
                      extra_info={"compute_estimated": [], "realrun": notes})
