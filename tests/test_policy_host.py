"""realrun.policy_host.on_executor: the replay's host times scaled to the executor's, on scripted runners."""
import numpy as np
import pytest

from conftest import tiny_model, unit_hardware
from realrun.policy_host import EXECUTOR_TOKENS, _replay, on_executor, policy_host_times
from sim.profiles import PolicyHostTime

# Seconds per call, by policy (the baselines all_resident and lru included).
COSTS = {"all_resident": {"on_layer_start": 1e-6, "start_layer": 1e-6, "chunk_landed": 0.0},
         "lru": {"on_layer_start": 2e-6, "start_layer": 1e-6, "chunk_landed": 4e-6},
         "belady": {"on_layer_start": 50e-6, "start_layer": 1e-6, "chunk_landed": 30e-6, "on_step_start": 20e-6}}


def scripted(factor: float = 1.0, extra_s: float = 0.0):
    """The replay, every host call reported at its scripted cost, `factor` times it plus `extra_s`."""
    def run(prepared, observer):
        costs = COSTS[prepared.policy.name]
        _replay(prepared, lambda call, _s: observer(call, costs.get(call, 0.0) * factor + extra_s))
    return run


@pytest.fixture
def trace(make_trace):
    rng = np.random.default_rng(5)
    return make_trace(tiny_model(layers=2, experts=6), [[[[int(e)] for e in rng.integers(0, 6, 2)] for _ in range(40)]
                                                         for _ in range(4)])


def charged():
    return {"belady": PolicyHostTime(40e-6, 3e-6, 20e-6, by_budget=((0.25, 30e-6, 3e-6, 10e-6),
                                                                     (0.5, 40e-6, 3e-6, 20e-6))),
            "lru": PolicyHostTime(1e-6, 0.0, 0.0, by_budget=((0.25, 1e-6, 0.0, 0.0), (0.5, 1e-6, 0.0, 0.0)))}


def test_an_executor_three_times_as_slow_triples_what_the_replay_charges(trace, tmp_path):
    scaled, record = on_executor(charged(), trace, unit_hardware(), 0.5, scripted(3.0), "bf16", tmp_path / "h",
                                 run_sim=scripted())
    assert record["request"] == 1 and record["tokens"] == EXECUTOR_TOKENS  # the one before replayed request 2
    belady = record["policies"]["belady"]
    assert belady["replay_s"][0] == pytest.approx(49e-6)  # per layer: 51 us beyond all_resident's 2 us
    assert [f for f, _ in belady["scale"]] == pytest.approx([3.0, 3.0, 3.0])
    assert scaled["belady"].layer_s == pytest.approx(120e-6) and scaled["belady"].land_s == pytest.approx(60e-6)
    assert [row[1] for row in scaled["belady"].by_budget] == pytest.approx([90e-6, 120e-6])
    # lru's landings are the landings' baseline: nothing beyond it to scale, and nothing added
    assert scaled["lru"].land_s == 0.0 and record["policies"]["lru"]["scale"][2] == [1.0, 0.0]


def test_a_fixed_cost_per_call_is_added_where_the_replay_is_too_small_to_scale(trace, tmp_path):
    # lru's per-layer time beyond all_resident's: 1 us in the replay (below the floor), 1 + 10 us on the executor
    def run_real(prepared, observer):
        costs = COSTS[prepared.policy.name]
        _replay(prepared, lambda call, _s: observer(call, costs.get(call, 0.0)
                                                    + (10e-6 if call == "on_layer_start" and prepared.policy.name == "lru"
                                                       else 0.0)))
    scaled, record = on_executor(charged(), trace, unit_hardware(), 0.5, run_real, "bf16", tmp_path / "h",
                                 run_sim=scripted())
    assert record["policies"]["lru"]["scale"][0] == [1.0, pytest.approx(10e-6)]
    assert scaled["lru"].layer_s == pytest.approx(11e-6)
    assert [f for f, _ in record["policies"]["belady"]["scale"]] == pytest.approx([1.0, 1.0, 1.0])
    assert scaled["belady"].layer_s == pytest.approx(40e-6)  # as the replay charged it


def test_a_trace_of_two_measures_on_its_first_request_trained_on_itself(make_trace, tmp_path):
    two = make_trace(tiny_model(layers=2, experts=6), [[[[e % 6] for e in range(2)] for _ in range(30)]] * 2)
    hosted, _ = policy_host_times(two, unit_hardware(), 0.5, ["finemoe"], max_requests=1)
    _, record = on_executor(hosted, two, unit_hardware(), 0.5, _replay, "bf16", tmp_path / "h")
    assert record["request"] == 0 and set(record["policies"]) == {"finemoe"}


def test_copy_launches_inside_a_call_are_not_its_time_and_those_outside_any_call_are_dropped():
    import time

    from realrun.policy_host import _Spent
    from sim.layer_protocol import LAUNCH

    spent = _Spent()
    spent(LAUNCH, 0.5)  # a demand started by an unpin, before the call below began: dropped
    time.sleep(0.02)
    begun = time.perf_counter()
    time.sleep(0.01)
    spent(LAUNCH, 0.004)  # inside the call
    took = time.perf_counter() - begun
    spent("start_layer", took)
    assert spent.calls["start_layer"] == [pytest.approx(took - 0.004)]
    spent("on_layer_start", 1e-6)  # nothing launched inside
    assert spent.calls["on_layer_start"] == [1e-6]
