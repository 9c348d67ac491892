"""Run a prepared run (sim.api.prepare) on real devices: execute_real(run, machine) -> RunResult.

The result has the simulator's RunMetrics, per-request and per-layer tables, so comparing the two
is a join; its policy_info["realrun"] says what ran (device, host buffers, layers).
"""
from __future__ import annotations

import time
from typing import Callable

from realrun.executor import Executor, Machine
from sim.api import PreparedRun, RunResult, replay_options, run_result


def execute_real(run: PreparedRun, machine: Machine, on_request_done: Callable[[int], None] | None = None,
                 notes: list[str] | None = None) -> RunResult:
    started = time.perf_counter()
    executor = Executor(machine, run.trace, run.policy, run.model, run.budget_bytes, run.replay,
                        replay_options(run.cfg), on_request_done)
    executor.prepare(run.train)
    state = executor.run()
    wall = time.perf_counter() - started
    executor.release()
    return run_result(run, state, wall, hardware_name=f"real: {machine.device_name}",
                      extra_info={"compute_estimated": [], "realrun": machine.notes() + list(notes or [])})
