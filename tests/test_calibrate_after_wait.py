"""calibrate's after-wait term: the fit, and its own validation against the measurements it stands
for (scripted responses, no GPU)."""
import pytest

from realrun.calibrate import _walls_after, after_wait_check, fit_after_wait
from sim.profiles import AfterWaitSpec

WARM = (0.2e-3, 0.1e-3)  # experts, non-expert launch groups


def response_of(spec: AfterWaitSpec | None, waits=(0.2e-3, 1e-3, 6e-3), groups=16, bump=0.0) -> dict:
    """What calibrate would have measured on a machine that behaves as `spec` (plus `bump` on the
    first group after every wait)."""
    def factors(wait):
        walls = _walls_after(spec, wait, groups, WARM) if spec else [WARM[i % 2] for i in range(groups)]
        return [w / WARM[i % 2] + (bump if i == 0 else 0.0) for i, w in enumerate(walls)]
    return {"warm_experts_s": WARM[0], "warm_non_expert_s": WARM[1],
            "after_copy_wait": [{"wait_s": w, "factors": factors(w)} for w in waits],
            "after_1s_idle": {"wait_s": 1.0, "factors": factors(1.0)}}


def test_a_model_checked_against_its_own_response_is_exact():
    spec = AfterWaitSpec(2.0, 0.5e-3, 20e-3)
    checks = after_wait_check(spec, response_of(spec))
    assert [c["wait_s"] for c in checks] == [0.2e-3, 1e-3, 6e-3, 1.0]
    assert all(c["rel_err"] == pytest.approx(0.0, abs=1e-12) for c in checks)


def test_the_check_says_at_which_waits_the_model_is_off():
    spec = AfterWaitSpec(2.0, 0.5e-3, 20e-3)
    checks = after_wait_check(spec, response_of(spec, bump=1.0))  # every wait costs one warm expert group more
    measured = [c["measured_s"] for c in after_wait_check(spec, response_of(spec))]
    for c, m in zip(checks, measured):
        assert c["measured_s"] == pytest.approx(m + WARM[0]) and c["rel_err"] < 0
    assert abs(checks[0]["rel_err"]) > abs(checks[-1]["rel_err"])  # the short wait, least slowed, is off most


def test_no_model_is_checked_as_warm_work_and_no_response_gives_no_check():
    response = response_of(AfterWaitSpec(3.0, 1e-3, 50e-3))
    checks = after_wait_check(None, response)
    assert all(c["model_s"] == pytest.approx(8 * sum(WARM)) and c["rel_err"] < 0 for c in checks)
    assert after_wait_check(None, {}) == []


def test_fit_recovers_the_model_the_response_came_from_and_none_when_waiting_costs_nothing():
    spec = AfterWaitSpec(2.5, 1e-3, 30e-3)
    fitted = fit_after_wait(response_of(spec))
    assert all(c["rel_err"] == pytest.approx(0.0, abs=0.02) for c in after_wait_check(fitted, response_of(spec)))
    assert fit_after_wait(response_of(None)) is None


def test_an_idle_slowdown_that_never_recovers_is_not_fitted_as_a_one_second_warm_up():
    # copy waits slow the next groups a little and briefly; after 1 s idle every group runs 2x slow
    # (a machine seen once): fitting that made every run cold. The copy waits alone are fitted.
    response = response_of(AfterWaitSpec(1.3, 1e-4, 5e-3))
    response["after_1s_idle"] = {"wait_s": 1.0, "factors": [2.0] * 16}
    fitted = fit_after_wait(response)
    assert fitted is not None and fitted.warm_up_s < 0.1 and fitted.cold_factor < 1.5
    checks = after_wait_check(fitted, response)
    assert all(abs(c["rel_err"]) < 0.02 for c in checks[:-1]) and checks[-1]["rel_err"] < -0.2  # the idle: said
