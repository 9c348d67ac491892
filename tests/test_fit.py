"""realrun.fit: the terms a validation run is solved for, and the solve."""
import dataclasses

import pytest

from conftest import tiny_model, unit_hardware
from realrun.fit import SCALERS, after_wait_scaled, decode_scaled, solve
from sim.profiles import AfterWaitSpec, HardwareProfile, ModelTerms, TimeTable

MODEL = tiny_model()


def profile() -> HardwareProfile:
    base = unit_hardware()
    return dataclasses.replace(
        base, expert_time_s={MODEL.expert_shape_key: TimeTable((1.0, 8.0), (0.1, 0.4))},
        non_expert_layer_time_s={MODEL.name: TimeTable((1.0, 8.0), (0.01, 0.05)), "other": TimeTable((1.0,), (0.2,))},
        after_wait=AfterWaitSpec(3.0, 1e-3, 0.1))


def test_the_decode_layer_scales_the_one_token_times_of_the_model_alone():
    scaled = decode_scaled(profile(), MODEL, 0.5)
    assert scaled.expert_time_s[MODEL.expert_shape_key].seconds == (0.05, 0.4)
    assert scaled.non_expert_layer_time_s[MODEL.name].seconds == (0.005, 0.05)
    assert scaled.non_expert_layer_time_s["other"].seconds == (0.2,)


def test_the_after_wait_term_scales_the_slowdown_beyond_one_and_a_models_own_term():
    assert after_wait_scaled(profile(), MODEL, 0.5).after_wait.cold_factor == 2.0
    assert after_wait_scaled(profile(), MODEL, 0.0).after_wait.cold_factor == 1.0  # no slowdown at all
    own = dataclasses.replace(profile(), per_model={MODEL.name: ModelTerms(AfterWaitSpec(5.0, 1e-3, 0.1))})
    scaled = after_wait_scaled(own, MODEL, 0.25)
    assert scaled.per_model[MODEL.name].after_wait.cold_factor == 2.0 and scaled.after_wait.cold_factor == 3.0
    with pytest.raises(ValueError, match="no after-wait term"):
        after_wait_scaled(dataclasses.replace(profile(), after_wait=None), MODEL, 0.5)


def test_solve_finds_the_scale_that_gives_the_target_and_stops_at_its_bounds():
    tpot = lambda s: 0.02 + 0.01 * s  # noqa: E731  (increasing in the scale, as a term's run is)
    assert solve(tpot, 0.0275, SCALERS["after_wait"][1]) == pytest.approx(0.75, abs=1e-4)
    assert solve(tpot, 0.01, SCALERS["after_wait"][1]) == 0.0  # faster than no slowdown at all: the bound
    assert solve(tpot, 1.0, SCALERS["decode_layer"][1]) == 3.0
