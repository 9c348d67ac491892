"""realrun's calibration and several devices, on the CPU (CI has no GPU): calibrate --gpus writes a
multi-GPU profile (and every policy's host time), and compare --gpus splits the layers over the
devices in both engines, deciding alike."""
import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import tiny_model, unit_hardware, write_trace
from policies import available, policy_class

pytest.importorskip("torch")  # realrun runs on torch; the core install has none
from realrun.backend import Backend
from realrun.calibrate import calibrate, fabric_keys, write_profile
from realrun.compare import run_compare
from realrun.executor import Machine, RealOptions
from realrun.fabric import Fabric, measure_fabric
from sim.profiles import load_hardware
from traces import load_trace
from traces.errors import UserError


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    rng = np.random.default_rng(11)
    requests = [[[list(rng.choice(4, 2, replace=False)) for _ in range(4)] for _ in range(n)] for n in (8, 6)]
    return load_trace(write_trace(tmp_path_factory.mktemp("t") / "trace", tiny_model(layers=4, experts=4, top_k=2),
                                  requests))


@pytest.fixture(scope="module")
def two_cpu_profile(tmp_path_factory, four_layers):
    backends = [Backend("cpu"), Backend("cpu")]
    result = calibrate(backends[0], [four_layers.model], copy_sizes=[1 << 20], tokens=[1, 2], trials=1, reps=1,
                       copy_reps=2, kv_tokens=8, others=backends[1:], policy_trace=four_layers,
                       train_fraction=0.5, spread_limit=float("inf"), validation_remeasures=1, decode_steps=20)
    return write_profile(result, tmp_path_factory.mktemp("p") / "two.yaml"), result


def test_calibrate_with_two_devices_writes_what_joins_them(two_cpu_profile):
    path, result = two_cpu_profile
    profile = load_hardware(str(path))
    assert profile.name == "cpux2-measured" and profile.num_gpus == 2
    assert profile.nvlink_pairs == ((0, 1),) and profile.nvlink.measured is not None
    assert profile.nvlink.copy_time(8 << 10) > 0
    assert any("host links alone" in note for note in result.notes)
    # calibrate measures no cpu section, so the policies that compute on the host CPU are left out
    assert set(profile.policy_host_s) == {p for p in available()
                                          if not p.startswith("test_") and not policy_class(p).uses_cpu}
    charged, hooks = profile.policy_host_s, profile.extra["calibration"]["policy_hooks_s"]
    assert charged["all_resident"].layer_s == charged["all_resident"].step_s == 0  # calibrate's host time has it
    assert charged["moe_infinity"].layer_s > 0 and charged["oracle_prefetch"].step_s > 0  # matching, planning
    assert set(hooks) == set(charged) and all(t["layer_s"] > 0 and t["step_s"] > 0 for t in hooks.values())
    assert "train fraction 0.5" in profile.extra["calibration"]["policy_host_trace"]


def test_fabric_keys_say_when_the_host_side_limits_the_links():
    free = Fabric(single_Bps=[50e9, 50e9], together_Bps=98e9)
    limited = Fabric(single_Bps=[50e9, 50e9], together_Bps=60e9, peer_curve=[[8e3, 1e-5], [6.4e7, 2e-4],
                                                                               [2.56e8, 7e-4]], pairs=[[0, 1]])
    assert fabric_keys(free) == {"num_gpus": 2, "nvlink": None, "host_aggregate_Bps": None}
    keys = fabric_keys(limited)
    assert keys["host_aggregate_Bps"] == 60e9 and keys["nvlink"]["pairs"] == [[0, 1]]
    assert keys["nvlink"]["bandwidth_Bps"] == pytest.approx(1 / ((7e-4 - 2e-4) / (2.56e8 - 6.4e7)))
    assert "through the host" in free.notes()[-1] and "limits them" in limited.notes()[0]


def test_measure_fabric_on_two_host_devices():
    fabric = measure_fabric([Backend("cpu"), Backend("cpu")], 1 << 20, copies=2, peer_reps=2, peer_sizes=[1024, 4096])
    assert len(fabric.single_Bps) == 2 and fabric.together_Bps > 0
    assert [size for size, _ in fabric.peer_curve] == [1024, 4096] and fabric.pairs == [[0, 1]]


def test_compare_on_two_devices_splits_layers_in_both_engines_and_decides_alike(four_layers, two_cpu_profile,
                                                                                  tmp_path):
    path, _ = two_cpu_profile
    machine = Machine(four_layers.model, RealOptions(device="cpu", gpus=2, kv_tokens=8))
    table = run_compare(four_layers, ["lru", "belady"], ["2experts", "4experts"], str(path), machine, tmp_path)
    assert (table["hit_rate_diff_pts"] == 0).all() and (table["bytes_h2d_rel_err"] == 0).all()
    runs = pd.read_csv(tmp_path / "runs.csv")
    assert set(runs["gpus"]) == {2}
    one = run_compare(four_layers, ["lru"], ["2experts"], str(path), Machine(four_layers.model, RealOptions(
        device="cpu", kv_tokens=8)), tmp_path / "one")  # a profile of two GPUs serves one
    assert one["hit_rate_diff_pts"].iloc[0] == 0 and set(pd.read_csv(tmp_path / "one" / "runs.csv")["gpus"]) == {1}
    one_gpu = tmp_path / "one-gpu.yaml"
    one_gpu.write_text(yaml.safe_dump(unit_hardware().to_dict()))
    with pytest.raises(UserError, match="describes 1 GPU"):
        run_compare(four_layers, ["lru"], ["2experts"], str(one_gpu), machine, tmp_path / "two")


def test_calibrate_validates_its_profile_and_records_rounds(two_cpu_profile):
    """On the CPU the timings mean nothing, but the profile must carry the validation's decisions
    (every check, what was measured again, the residual per term) and every quantity's rounds."""
    path, result = two_cpu_profile
    cal = load_hardware(str(path)).extra["calibration"]
    validation = cal["validation"]
    assert [c["policy"] for c in validation["checks"]] == ["all_resident", "lru", "oracle_prefetch"]
    assert len(validation["remeasured_terms"]) <= 1  # the bound given
    assert set(validation["residual_error"]) <= {"decode_layer", "after_wait", "copies"}
    assert all(abs(err) > validation["tolerance"] for err in validation["residual_error"].values())
    assert set(cal["rounds"]) == {"copies", "decode_layer"}  # after_wait needs a GPU
    assert cal["rounds"]["copies"]["worst"]["rounds"] >= 3
    assert "decode four" not in cal["rounds"]["decode_layer"]["spread"]  # keyed by model name and mode
    assert any(note.startswith("validation") for note in result.notes)


def test_compare_header_records_code_command_machine_and_the_profiles_validation(two_cpu_profile):
    from realrun.compare import provenance

    path, _ = two_cpu_profile
    validation = load_hardware(str(path)).extra["calibration"]["validation"]
    lines = provenance(["--layers", "4", "--policies", "lru,belady"], "cpu", validation)
    assert lines[0].startswith("- code: ") and len(lines[0].split()[2]) in (40, len("unknown"))
    assert lines[1] == "- command: `python -m realrun.compare --layers 4 --policies lru,belady`"
    assert lines[2].startswith("- machine: cpu on host ")
    assert "all_resident" in lines[3] and "oracle_prefetch" in lines[3]
    assert provenance([], "cpu", None)[3].startswith("- profile's validation: none recorded")
