"""Open loops offered more than the system serves: the run reports load against capacity and warns."""
import io

import numpy as np
import pytest
from rich.console import Console

from conftest import tiny_model, unit_hardware
from sim.api import simulate
from sim.config import SimConfig
from sim.overload import busy_seconds
from sim.report import print_run


def report(trace, **kwargs) -> str:
    # Each request: 4 decode steps, one expert that never stays (budget 1 expert, two alternate): ~4.4 s.
    result = simulate(SimConfig(policy="lru", budget="1experts", hardware=unit_hardware().to_dict(),
                                max_requests=30, **kwargs), trace=trace)
    out = io.StringIO()
    print_run(result, Console(file=out, width=200))
    return out.getvalue()


@pytest.fixture
def trace(make_trace):
    return make_trace(tiny_model(experts=2), [[[[i % 2]] for i in range(4)]] * 30)


def test_an_overloaded_open_loop_warns_that_its_queue_grows_without_bound(trace):
    text = report(trace, arrival="poisson", rate_rps=2.0)
    row = next(line for line in text.splitlines() if "offered load / capacity" in line)
    offered, capacity = (float(x) for x in row.split("│")[2].split("(")[0].split("/"))
    assert offered == 2.0 and 0.15 < capacity < 0.3  # one request per ~4.4 s of service
    assert "warning: offered load 2 requests/s is" in text and "the queue grows without bound" in text


def test_a_light_open_loop_reports_its_load_without_a_warning(trace):
    text = report(trace, arrival="poisson", rate_rps=0.01)
    assert "offered load / capacity" in text and "warning" not in text


def test_the_table_has_the_documented_throughput_row_and_closed_loops_no_load_row(trace):
    text = report(trace)
    assert "throughput (output tokens/s)" in text and "offered load" not in text


def test_busy_time_is_the_union_of_service_intervals():
    assert busy_seconds(np.array([0.0, 1.0, 5.0]), np.array([2.0, 3.0, 6.0])) == 4.0
