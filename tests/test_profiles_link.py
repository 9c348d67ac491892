"""Hardware profiles: the measured copy-time curve of a link, and its round trip through YAML data."""
import math

import pytest

from sim.errors import ConfigError
from sim.profiles import HardwareProfile, LinkSpec


def test_measured_curve_is_interpolated_and_the_fit_covers_smaller_copies():
    link = LinkSpec.from_dict({"latency_s": 1e-5, "bandwidth_Bps": 1e9,
                               "copy_time_s": [[1e6, 5e-3], [3e6, 8e-3], [5e6, 10e-3]]}, "link")
    assert link.copy_time(2e6) == pytest.approx(6.5e-3)  # between the measured points
    assert link.copy_time(7e6) == pytest.approx(12e-3)  # past the last: the last segment's slope
    assert link.copy_time(1e3) == pytest.approx(1e-5 + 1e-6)  # below the curve: latency + bytes / bandwidth
    assert LinkSpec.from_dict(link.to_dict(), "link") == link


def test_profile_round_trip_keeps_the_curve_and_rejects_a_bad_one():
    data = {"name": "x", "gpu_memory_bytes": 1e9, "mem_bandwidth_Bps": 1e12, "matmul_flops": 1e15,
            "host_link": {"latency_s": 0.0, "bandwidth_Bps": 1e9, "copy_time_s": [[1e6, 1e-3]]}}
    profile = HardwareProfile.from_dict(data)
    assert HardwareProfile.from_dict(profile.to_dict()) == profile
    data["host_link"]["copy_time_s"] = [[0, 1e-3]]
    with pytest.raises(ConfigError, match="bytes > 0"):
        HardwareProfile.from_dict(data)


def test_per_model_terms_replace_the_top_level_ones_for_that_model_alone():
    aw = {"cold_factor": 2.0, "warm_up_s": 1e-3, "cool_down_s": 1e-1}
    data = {"name": "x", "gpu_memory_bytes": 1e9, "mem_bandwidth_Bps": 1e12, "matmul_flops": 1e15,
            "host_link": {"latency_s": 0.0, "bandwidth_Bps": 1e9}, "after_wait": aw,
            "policy_host_s": {"lru": {"layer_s": 1e-5, "step_s": 0.0}},
            "per_model": {"m2": {"after_wait": {**aw, "cold_factor": 3.0},
                                 "policy_host_s": {"lru": {"layer_s": 2e-5, "step_s": 1e-6},
                                                   "mine": {"same_as": "lru"}}}}}
    profile = HardwareProfile.from_dict(data)
    assert HardwareProfile.from_dict(profile.to_dict()) == profile
    m2, m1 = profile.for_model("m2"), profile.for_model("m1")
    assert (m2.after_wait.cold_factor, m1.after_wait.cold_factor) == (3.0, 2.0)
    assert m2.policy_host_time("lru").layer_s == 2e-5 and m1.policy_host_time("lru").layer_s == 1e-5
    assert m2.policy_host_time("mine").layer_s == 2e-5
    assert "per_model" not in m2.to_dict()  # what a run records is what it was charged
    with pytest.raises(ConfigError, match="per_model.m2"):
        HardwareProfile.from_dict({**data, "per_model": {"m2": {"after_weight": aw}}})


def test_after_wait_model_slows_work_that_starts_cold_and_recovers_under_load(make_trace):
    from conftest import tiny_model, unit_hardware
    from sim.api import simulate
    from sim.compute import ComputeModel
    from sim.config import SimConfig
    from sim.profiles import AfterWaitSpec

    warm = unit_hardware().to_dict()
    compute = ComputeModel(HardwareProfile.from_dict({**warm, "after_wait": {"cold_factor": 2.0, "warm_up_s": 1.0,
                                                                             "cool_down_s": 0.5}}), tiny_model())
    assert compute.run(0, 0.0, 0.1) == pytest.approx(0.2)  # starts cold
    warmth = 1 - math.exp(-0.2)  # after 0.2 s of work
    wall = compute.run(0, 0.2, 0.1)  # no wait between
    assert wall == pytest.approx(0.1 * (2 - warmth))
    warmth = 1 - (1 - warmth) * math.exp(-wall)
    assert compute.run(0, 0.2 + wall + 0.25, 0.1) == pytest.approx(0.1 * (2 - warmth * math.exp(-0.5)))  # waited 0.25 s
    assert compute.run(0, 100.0, 0.1) == pytest.approx(0.2)  # cold again after a long wait
    assert compute.run(1, 0.0, 0.1) == pytest.approx(0.2)  # each GPU has its own state
    assert ComputeModel(HardwareProfile.from_dict(warm), tiny_model()).run(0, 0.0, 0.1) == 0.1
    with pytest.raises(ConfigError, match="cold_factor"):
        AfterWaitSpec.from_dict({"cold_factor": 0.5, "warm_up_s": 1, "cool_down_s": 1}, "after_wait")

    trace = make_trace(tiny_model(), [[[[0]]] * 5])
    def tpot(after_wait):
        hardware = {**warm, "after_wait": after_wait} if after_wait else warm
        return simulate(SimConfig(policy="all_resident", hardware=hardware), trace=trace).metrics.tpot_mean_s
    never_warm = {"cold_factor": 3.0, "warm_up_s": 1e9, "cool_down_s": 1.0}
    assert tpot(never_warm) == pytest.approx(3 * tpot(None))
    assert tpot({**never_warm, "warm_up_s": 1e-9}) == pytest.approx(tpot(None))


def test_the_shipped_measured_profile_has_every_table_the_simulator_needs():
    from sim.profiles import load_hardware
    from traces.model_spec import known_models, load_model_spec

    profile = load_hardware("h100-measured")
    assert profile.host_link.measured is not None and profile.after_wait is not None
    for name in sorted(set(known_models()) - {"gpt-oss-20b"}):  # gpt-oss: not calibrated on a GPU yet (roofline)
        assert all(profile.measured_for(load_model_spec(name)).values()), name
    assert not any(profile.measured_for(load_model_spec("gpt-oss-20b")).values())
    assert 6e-3 < profile.host_link.copy_time(352_321_536) < 7e-3  # one Mixtral expert, as measured


def test_policy_host_time_delays_each_layer_and_the_copies_it_decides(make_trace):
    from conftest import tiny_model, unit_hardware
    from sim.api import simulate
    from sim.config import SimConfig

    model = tiny_model(layers=2)
    trace = make_trace(model, [[[[0], [1]]] * 6])
    plain = unit_hardware(copy_s=0.5, expert_s=0.1, non_expert_s=0.01).to_dict()
    decided = {**plain, "policy_host_s": {"all_resident": {"layer_s": 0.002, "step_s": 0.03},
                                          "lru": {"layer_s": 0.002, "step_s": 0.0}}}

    def tpot(hardware, policy, budget="1expert"):
        return simulate(SimConfig(policy=policy, budget=budget, hardware=hardware), trace=trace).metrics.tpot_mean_s
    # nothing to copy: every decision adds its time (two layers and one pass per token)
    assert tpot(decided, "all_resident") == pytest.approx(tpot(plain, "all_resident") + 2 * 0.002 + 0.03)
    # every layer misses: its demand copy goes out once the policy has decided, so the decision delays it
    assert tpot(decided, "lru") == pytest.approx(tpot(plain, "lru") + 2 * 0.002)
    charged = simulate(SimConfig(policy="all_resident", hardware=decided), trace=trace).metrics.policy_info
    assert charged["policy_host_s"] == {"layer_s": 0.002, "step_s": 0.03}  # the report says what it charged
    assert simulate(SimConfig(policy="belady", hardware=plain), trace=trace).metrics.policy_info[
        "policy_host_uncharged"] == "hardware 'unit' measured no policy's host time"
    profile = HardwareProfile.from_dict(decided)
    assert HardwareProfile.from_dict(profile.to_dict()) == profile


def test_a_policy_a_measured_profile_lacks_is_an_error_or_charged_as_told(make_trace):
    from conftest import tiny_model, unit_hardware
    from sim.api import simulate
    from sim.config import SimConfig

    trace = make_trace(tiny_model(layers=2), [[[[0], [1]]] * 6])
    plain = unit_hardware(copy_s=0.5, expert_s=0.1, non_expert_s=0.01).to_dict()
    decided = {**plain, "policy_host_s": {"lru": {"layer_s": 0.002, "step_s": 0.0}, "all_resident": {"same_as": "lru"}}}

    def run(policy, **cfg):
        return simulate(SimConfig(policy=policy, budget="1expert", hardware=decided, **cfg), trace=trace).metrics
    with pytest.raises(ConfigError, match="no measured host time for policy 'belady'.*policy_host=zero"):
        run("belady")
    plain_tpot = simulate(SimConfig(policy="belady", budget="1expert", hardware=plain), trace=trace).metrics.tpot_mean_s
    zero = run("belady", policy_host="zero")
    assert zero.tpot_mean_s == plain_tpot and zero.policy_info["policy_host_uncharged"] == "policy_host=zero"
    as_lru = run("belady", policy_host="lru")  # every layer misses: the decision delays its demand copy
    assert as_lru.tpot_mean_s == pytest.approx(plain_tpot + 2 * 0.002)
    assert as_lru.policy_info["policy_host_s"] == {"layer_s": 0.002, "step_s": 0.0, "same_as": "lru"}
    # the profile's own stand-in: all_resident is charged lru's measured time, and says so
    assert run("all_resident").policy_info["policy_host_s"]["same_as"] == "lru"
    with pytest.raises(ConfigError, match="policy_host=all_resident: .* use zero or one of: lru"):
        run("belady", policy_host="all_resident")  # a stand-in is not a measurement
    with pytest.raises(ConfigError, match="same_as 'belady' is not a policy this profile measured"):
        HardwareProfile.from_dict({**plain, "policy_host_s": {"lru": {"same_as": "belady"}}})
    with pytest.raises(ConfigError, match="policy_host_s.lru"):
        HardwareProfile.from_dict({**plain, "policy_host_s": {"lru": {"layer_s": -1, "step_s": 0}}})
    with pytest.raises(ConfigError, match="expected"):
        HardwareProfile.from_dict({**plain, "policy_host_s": {"lru": {"layer": 1}}})


def test_every_shipped_policy_has_a_host_time_on_every_measured_profile_it_runs_on():
    from policies import available, policy_class
    from sim.profiles import known_hardware, load_hardware

    shipped = [n for n in available() if policy_class(n).__module__.startswith("policies.")]
    measured = [p for p in map(load_hardware, known_hardware()) if p.policy_host_s]
    assert {p.name for p in measured} >= {"h100-measured", "h200-measured", "h200x2-measured"}
    for profile in measured:
        for name in shipped:
            if policy_class(name).uses_cpu and profile.cpu is None:
                continue  # cannot run there: the engine refuses it for want of a cpu section
            time = profile.policy_host_time(name)  # raises where the profile lacks it
            assert time.stand_in is None or time.stand_in in profile.measured_policies(), (profile.name, name)


def test_each_landing_costs_the_host_its_time_before_the_layer_goes_on_and_the_fast_engine_declines(make_trace):
    from conftest import tiny_model, unit_hardware
    from sim.api import simulate
    from sim.config import SimConfig

    trace = make_trace(tiny_model(layers=2), [[[[0], [1]]] * 6])
    plain = unit_hardware(copy_s=0.5, expert_s=0.1, non_expert_s=0.01).to_dict()

    def run(times, budget="1expert", **cfg):
        hardware = {**plain, "policy_host_s": {"lru": times}}
        return simulate(SimConfig(policy="lru", budget=budget, hardware=hardware, **cfg), trace=trace).metrics
    base = run({"layer_s": 0.0, "step_s": 0.0})
    landing = run({"layer_s": 0.0, "step_s": 0.0, "land_s": 0.2})
    # every layer misses: the block is seen resident once its landing is handled, 0.2 s after it lands
    assert landing.tpot_mean_s == pytest.approx(base.tpot_mean_s + 2 * 0.2)
    assert landing.hit_rate == base.hit_rate and base.policy_info["engine"] == "fast"
    assert landing.policy_info["engine"] == "simpy"  # the fast engine models no landing's host time
    with pytest.raises(ConfigError, match="engine=fast: .*land_s"):
        run({"layer_s": 0.0, "step_s": 0.0, "land_s": 0.2}, engine="fast")
    # by budget: 1 of 8 experts is below the first row, so its times are charged; 3 of 8 is halfway
    rows = [[0.25, 0.0, 0.0, 0.1], [0.5, 0.0, 0.0, 0.3]]
    assert run({"layer_s": 0.0, "step_s": 0.0, "by_budget": rows}).tpot_mean_s == pytest.approx(
        base.tpot_mean_s + 2 * 0.1)
    time = HardwareProfile.from_dict({**plain, "policy_host_s": {"lru": {"layer_s": 1.0, "step_s": 2.0,
                                                                          "by_budget": rows}}}).policy_host_s["lru"]
    assert time.at(0.375).land_s == pytest.approx(0.2) and time.at(0.9).land_s == 0.3 and time.charges_landings
    assert time.at(0.375).layer_s == 0.0  # the rows hold every time, the top-level ones are the half's
    with pytest.raises(ConfigError, match="by_budget: each row"):
        HardwareProfile.from_dict({**plain, "policy_host_s": {"lru": {"layer_s": 0, "step_s": 0,
                                                                       "by_budget": [[1.5, 0, 0, 0]]}}})
