"""The fast engine (sim.fast) against the SimPy engine, the reference: every metric, every per-request
and per-layer value and every TPOT sample equal, on every shipped trace, one and several GPUs
(shared host bandwidth, NVLink pairs), batched and with Poisson arrivals, with and without compute
warm-up after waits (after_wait: the default, measured profile has it). The prefetching policies
(deepspeed, oracle_prefetch: sim.fast.stream) are checked on shipped traces cut short, as the SimPy
engine is slow on them."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from policies import make_policy
from sim.api import simulate
from sim.config import SimConfig
from sim.errors import ConfigError
from sim.profiles import load_hardware
from conftest import tiny_model, unit_hardware
from traces import load_trace
from traces.compact import CompactConfig, compact_trace
from traces.defaults import shipped_traces

POLICIES = [("lru", {}), ("lru", {"scope": "global"}), ("all_resident", {}), ("belady", {}),
            ("belady", {"scope": "per_layer"})]
DEMAND = [POLICIES[i] for i in (0, 1, 3, 4)]
PREFETCHING = [("deepspeed", {}), ("oracle_prefetch", {})]  # sim.fast.stream


def assert_identical(reference, fast) -> None:
    a, b = reference.metrics.to_dict(), fast.metrics.to_dict()
    assert a["policy_info"].pop("engine") == "simpy"
    assert b["policy_info"].pop("engine") == "fast"
    for key in a:
        assert a[key] == b[key] or (isinstance(a[key], float) and math.isnan(a[key]) and math.isnan(b[key])), key
    pd.testing.assert_frame_equal(reference.per_request, fast.per_request, check_exact=True)
    pd.testing.assert_frame_equal(reference.per_layer, fast.per_layer, check_exact=True)
    assert reference.token_latencies_s == fast.token_latencies_s


def both(loaded=None, **settings):
    """The reference's and the fast engine's results (on a loaded trace, if given)."""
    return simulate(SimConfig(engine="simpy", **settings), trace=loaded), \
        simulate(SimConfig(engine="fast", **settings), trace=loaded)


@pytest.fixture(scope="module")
def short(tmp_path_factory):
    """A shipped trace cut to its first 3 requests of at most 8 decode iterations each (prompts as
    per-expert counts): the prefetching policies are slow on the SimPy engine."""
    made = {}

    def cut(name: str):
        if name not in made:
            out = tmp_path_factory.mktemp("short") / name.replace("/", "_")
            made[name] = load_trace(compact_trace(CompactConfig(src=name, out=str(out), requests=3, decode_iters=8)))
        return made[name]

    return cut


@pytest.mark.parametrize("trace", shipped_traces())
@pytest.mark.parametrize("policy,params", POLICIES)
def test_every_shipped_trace(trace, policy, params):
    budget = "12experts" if "qwen" not in trace else "64experts"  # room for a Qwen prefill's 60 experts
    assert_identical(*both(trace=trace, policy=policy, policy_params=params, budget=budget, max_requests=2))


@pytest.mark.parametrize("hardware", ["h200-measured", "h100"])  # with and without after_wait
@pytest.mark.parametrize("budget", ["6GB", "3experts", "20experts", "200experts"])
@pytest.mark.parametrize("policy,params", DEMAND)
def test_budgets(hardware, budget, policy, params):
    assert_identical(*both(hardware=hardware, policy=policy, policy_params=params, budget=budget, max_requests=3))


# shared host bandwidth; NVLink pairs; two measured GPUs with after_wait
@pytest.mark.parametrize("hardware", ["rtx3090x6", "h200x2", "h200x2-measured"])
@pytest.mark.parametrize("serving", [{}, {"max_batch": 4, "clients": 4}, {"warm_start": True},
                                     {"max_batch": 3, "arrival": "poisson", "rate_rps": 2.0}])
@pytest.mark.parametrize("policy,params", POLICIES[:2])
def test_several_gpus_batched_arrivals(hardware, serving, policy, params):
    assert_identical(*both(hardware=hardware, policy=policy, policy_params=params, budget="12experts",
                           max_requests=5, **serving))


@pytest.mark.parametrize("hardware", ["rtx3090x6", "h200x2", "h200x2-measured"])
@pytest.mark.parametrize("policy,params", DEMAND[2:])
def test_belady_several_gpus(hardware, policy, params):  # it reads the future: one request at a time
    assert_identical(*both(hardware=hardware, policy=policy, policy_params=params, budget="12experts",
                           max_requests=4, warm_start=True))


@pytest.mark.parametrize("trace", shipped_traces())
@pytest.mark.parametrize("policy,params", PREFETCHING)
def test_prefetching_every_shipped_trace(short, trace, policy, params):
    budget = "12experts" if "qwen" not in trace else "64experts"
    assert_identical(*both(short(trace), policy=policy, policy_params=params, budget=budget))


@pytest.mark.parametrize("hardware", ["h200-measured", "h100"])  # with and without after_wait
@pytest.mark.parametrize("budget", ["6GB", "3experts", "20experts", "200experts"])
@pytest.mark.parametrize("policy,params", PREFETCHING + [("oracle_prefetch", {"horizon_steps": 2})])
def test_prefetching_budgets(short, hardware, budget, policy, params):
    assert_identical(*both(short("mixtral-8x7b-gsm8k"), hardware=hardware, policy=policy, policy_params=params,
                           budget=budget))


@pytest.mark.parametrize("hardware", ["h200x2", "h200x2-measured"])
@pytest.mark.parametrize("serving", [{}, {"warm_start": True}, {"max_batch": 3, "clients": 3},
                                     {"max_batch": 2, "arrival": "poisson", "rate_rps": 20.0}])
@pytest.mark.parametrize("policy,params", PREFETCHING)
def test_prefetching_several_gpus_batched_arrivals(short, hardware, serving, policy, params):
    if policy == "oracle_prefetch" and serving.get("max_batch", 1) > 1:  # it reads the future: one at a time
        serving = {**serving, "max_batch": 1, "clients": 1}
    assert_identical(*both(short("standin/mixtral-8x7b-lmsys"), hardware=hardware, policy=policy,
                           policy_params=params, budget="12experts", **serving))


def test_prefetching_shared_host_bandwidth_declines(short):
    """DeepSpeed on six GPUs whose host copies share the host's bandwidth: the next GPU's layer is
    streamed in while this one still copies, which the fluid model re-plans; the fast engine
    declines, and the run is the reference's."""
    settings = dict(policy="deepspeed", hardware="rtx3090x6", budget="12experts")
    reference = simulate(SimConfig(engine="simpy", **settings), trace=short("standin/mixtral-8x7b-lmsys"))
    auto = simulate(SimConfig(**settings), trace=short("standin/mixtral-8x7b-lmsys"))
    assert auto.metrics.policy_info["engine"] == ("simpy (the fast engine declined: host copies of two GPUs overlap "
                                                  "on the shared host bandwidth (its fluid model re-plans))")
    assert auto.token_latencies_s == reference.token_latencies_s


def test_after_wait_with_shared_host_bandwidth():
    """Warm-up after waits on six GPUs that share the host's bandwidth (rtx3090x6 with the measured
    H200's after_wait)."""
    hardware = load_hardware("rtx3090x6").to_dict()
    hardware["after_wait"] = load_hardware("h200-measured").after_wait.to_dict()
    assert_identical(*both(hardware=hardware, policy="lru", budget="12experts", max_requests=4, max_batch=2,
                           clients=3))


def test_engine_choice():
    assert simulate(SimConfig(max_requests=1)).metrics.policy_info["engine"] == "fast"  # the default command
    assert simulate(SimConfig(max_requests=1, engine="simpy")).metrics.policy_info["engine"] == "simpy"
    # a subclass of LRU that prefetches does not inherit the declaration
    assert type(make_policy("mixtral_offload")).__dict__.get("fast_path") is None
    assert simulate(SimConfig(policy="mixtral_offload", max_requests=1)).metrics.policy_info["engine"] == "simpy"
    with pytest.raises(ConfigError, match="engine=fast: policy 'mixtral_offload' declares no fast path"):
        simulate(SimConfig(policy="mixtral_offload", max_requests=1, engine="fast"))
    with pytest.raises(ConfigError, match="engine 'numba' unknown"):
        simulate(SimConfig(max_requests=1, engine="numba"))


def test_declines_to_the_reference(make_trace):
    """A copy landing at the very instant the compute finishes an expert: which goes first is SimPy's
    event order, which the kernel does not model. It declines and the run falls back to SimPy."""
    model = tiny_model(layers=1, experts=4, top_k=2)
    trace = make_trace(model, [[[[0, 1]], [[2, 3]], [[0, 2]]]])
    settings = dict(policy="lru", budget="2experts", hardware=unit_hardware(copy_s=1.0, expert_s=1.0,
                                                                            non_expert_s=0.5).to_dict())
    reference = simulate(SimConfig(engine="simpy", **settings), trace=trace)
    auto = simulate(SimConfig(**settings), trace=trace)
    assert auto.metrics.policy_info["engine"].startswith("simpy (the fast engine declined")
    assert auto.metrics.hit_rate == reference.metrics.hit_rate
    assert auto.token_latencies_s == reference.token_latencies_s
