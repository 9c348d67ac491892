"""realrun.refit: a profile's off terms taken from the executor runs its validation recorded."""
import numpy as np
import pytest

from conftest import tiny_model, unit_hardware

pytest.importorskip("torch")  # realrun runs on torch; the core install has none
from realrun.refit import main, refit
from sim.api import execute, prepare
from sim.config import SimConfig
from sim.profiles import HardwareProfile
from traces.errors import UserError


@pytest.fixture
def trace(make_trace):
    rng = np.random.default_rng(2)
    return make_trace(tiny_model(layers=2, experts=4), [[[[int(e)] for e in rng.integers(0, 4, 2)] for _ in range(20)]])


def profile(validation=None) -> dict:
    data = {**unit_hardware().to_dict(), "after_wait": {"cold_factor": 3.0, "warm_up_s": 0.05, "cool_down_s": 1.0}}
    data.pop("cpu", None)
    return {**data, **({"calibration": {"validation": validation}} if validation is not None else {})}


def tpot(data: dict, trace, policy: str) -> float:
    cfg = SimConfig(trace=str(trace.path), policy=policy, budget="4experts", hardware=data,
                    expert_format="bf16", train_fraction=0.0)
    return execute(prepare(cfg, trace)).metrics.tpot_mean_s


def check(policy, term, sim, real):
    return {"policy": policy, "budget": "half", "term": term, "tpot_mean_s_sim": sim, "tpot_mean_s_real": real,
            "tpot_rel_err": sim / real - 1}


def test_a_term_off_is_solved_for_and_one_within_tolerance_is_left(trace, tmp_path):
    lru, resident = tpot(profile(), trace, "lru"), tpot(profile(), trace, "all_resident")
    no_slowdown = tpot({**profile(), "after_wait": {**profile()["after_wait"], "cold_factor": 1.0}}, trace, "lru")
    measured = (lru + no_slowdown) / 2  # the executor ran lru as if the slowdown were about half the profile's
    validation = {"tolerance": 0.03, "checks": [check("all_resident", "decode_layer", resident, resident * 1.01),
                                                 check("lru", "after_wait", lru, measured)]}
    assert lru / measured - 1 > 0.03
    refitted, fitted = refit(profile(validation), trace, 0.0, None, tmp_path)
    assert set(fitted) == {"after_wait"} and 0 < fitted["after_wait"] < 1
    assert HardwareProfile.from_dict(refitted).after_wait.cold_factor == pytest.approx(1 + 2 * fitted["after_wait"])
    assert tpot(refitted, trace, "lru") == pytest.approx(measured, rel=1e-3)
    assert refitted["calibration"]["validation"] == validation  # what it was fitted to, kept


def test_a_profile_without_validation_is_one_clear_error(trace, tmp_path, capsys):
    with pytest.raises(UserError, match="records no validation"):
        refit(profile(), trace, 0.0, None, tmp_path)
    import yaml
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(profile()))
    with pytest.raises(SystemExit):
        main([str(path), "--trace", str(trace.path), "--train-fraction", "0", "--replayed-host-time",
              "--out", str(tmp_path / "out.yaml")])
    assert "no replayed host time recorded" in capsys.readouterr().err and not (tmp_path / "out.yaml").exists()
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing.yaml"), "--trace", str(trace.path), "--train-fraction", "0", "--out", "o.yaml"])
    assert "not a profile YAML" in capsys.readouterr().err
