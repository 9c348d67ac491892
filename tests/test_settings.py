"""Typed settings: every value is checked against SimConfig's field types (and a policy's knobs
against its __init__), each default has one place, and a bad setting is one line with status 2."""
import json
import subprocess
import sys
from conftest import repo_env

import pytest
from hydra import compose, initialize_config_module

from sim.cli import config_from_hydra
from sim.config import SimConfig, defaults
from sim.errors import ConfigError
from traces.errors import UserError
from policies import make_policy


def composed(*overrides):
    with initialize_config_module(config_module="conf.cli", version_base=None):
        return config_from_hydra(compose("config", overrides=list(overrides)))


@pytest.mark.parametrize("override, message", [
    ("seed=abc", "seed=abc: expected an integer"),
    ("seed=1.5", "seed=1.5: expected an integer"),
    ("rate_rps=fast", "rate_rps=fast: expected a number"),
    ("rate_rps=0", "rate_rps=0"),
    ("max_requests=2.5", "max_requests=2.5: expected an integer or null"),
    ("max_requests=0", "max_requests=0: expected an integer of at least 1"),
    ("clients=two", "clients=two: expected an integer"),
    ("train_fraction=x", "train_fraction=x: expected a number"),
    ("train_fraction=1.5", "train_fraction=1.5: expected a number in [0, 1)"),
    ("warm_start=maybe", "warm_start=maybe: expected a boolean (true or false)"),
    ("warm_start=0", "warm_start=0: expected a boolean (true or false)"),
    ("max_batch=1.5", "max_batch=1.5: expected an integer"),
    ("arrival=sometimes", "arrival=sometimes: expected one of closed, poisson, trace"),
    ("gpus=two", "gpus=two: expected an integer or null"),
])
def test_a_value_of_the_wrong_type_names_the_key_the_value_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError) as err:
        composed(override)
    assert message in str(err.value)


def test_good_values_pass_and_hydra_booleans_are_booleans():
    cfg = composed("warm_start=true", "seed=3", "rate_rps=2", "max_requests=5", "train_fraction=0")
    assert cfg.warm_start is True and cfg.seed == 3 and cfg.max_requests == 5
    assert isinstance(cfg.rate_rps, float) and isinstance(cfg.train_fraction, float)


def test_every_default_has_one_place_the_dataclass():
    # What python -m sim composes with no override is SimConfig() itself.
    assert composed().to_dict() == SimConfig().to_dict() == defaults()


@pytest.mark.parametrize("knob, message", [
    ("distance='far'", "policy 'finemoe': policy.distance=far: expected an integer"),
    ("online=1", "policy 'finemoe': policy.online=1: expected a boolean"),
    ("delta='x'", "policy 'finemoe': policy.delta=x: expected a number or null"),
])
def test_a_policy_knob_of_the_wrong_type_names_the_knob_and_the_policy(knob, message):
    key, value = knob.split("=")
    with pytest.raises(UserError) as err:
        make_policy("finemoe", **{key: eval(value)})
    assert message in str(err.value)


def sim(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "sim", *args, "progress=false", "max_requests=1"],
                          cwd=tmp_path, env=repo_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["seed=abc"], "seed=abc: expected an integer"),
    (["hardware=nope"], "unknown hardware 'nope'; known profiles: "),
    (["model=nope"], "unknown model 'nope'; known models: "),
    (["nosuchkey=1"], "unknown setting nosuchkey=1; known settings: "),
    (["+nosuchkey=1"], "unknown setting nosuchkey=1; known settings: "),
    (["+policy=finemoe", "policy.distance=far"], "policy.distance=far: expected an integer"),
    (["+policy=lru", "policy.nosuch=1"], "policy 'lru' has no knob nosuch; its knobs: scope"),
    (["policy.scope=global"], "policy.scope=global: a policy knob needs its policy first, e.g. +policy=lru"),
    (["hardware.x=1"], "unknown setting hardware.x=1"),
    (["seed=[1"], "cannot parse the override(s) seed=[1"),
    (["+policy=lru,belady"], "+policy=lru,belady lists several values: add -m to sweep over them"),
    (["model.expert_format=fp4"], "expert_format=fp4: expected one of bf16, fp8, int4, mxfp4 or null"),
])
def test_the_command_line_refuses_bad_settings_in_one_line_and_leaves_no_run_directory(tmp_path, args, message):
    done = sim(tmp_path, *args)
    err = done.stderr.strip()
    assert done.returncode == 2 and err.startswith("error: ") and message in err and "\n" not in err, err
    assert not (tmp_path / "outputs").exists(), "a refused run left its output directory"


def test_a_transformers_config_json_is_a_model_on_the_command_line(tmp_path):
    mixtral = {"num_hidden_layers": 32, "num_local_experts": 8, "num_experts_per_tok": 2, "hidden_size": 4096,
               "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8}
    (tmp_path / "config.json").write_text(json.dumps(mixtral))
    done = sim(tmp_path, "trace=mixtral-8x7b-gsm8k", f"model={tmp_path / 'config.json'}", "hydra.run.dir=run")
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["budget_bytes"] == 6 * 10**9 and metrics["requests"] == 1


def test_paths_are_taken_where_a_setting_names_a_file():
    from pathlib import Path

    assert SimConfig(trace=Path("/data/trace")).trace == "/data/trace"
    with pytest.raises(ConfigError, match="budget=6: expected a string"):
        SimConfig(budget=6)


def test_the_expert_format_from_the_command_line_sets_the_bytes_a_copy_moves(tmp_path):
    done = sim(tmp_path, "model.expert_format=bf16", "hydra.run.dir=run")
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["policy_info"]["expert_format"] == "bf16"
    assert metrics["policy_info"]["bytes_per_expert"] == 49_783_680  # gpt-oss-20b's expert in bf16


def test_realrun_settings_are_the_executor_defaults():
    """python -m realrun composes its `realrun` node from RealOptions (realrun.__main__.register): the
    composed settings are RealOptions' defaults, and conf/cli/realrun.yaml writes none of them."""
    pytest.importorskip("torch")
    from dataclasses import asdict

    import yaml
    from hydra import compose, initialize_config_module

    import realrun.__main__  # noqa: F401 - registers the node
    from conf import CLI_CONF_DIR
    from realrun.executor import RealOptions

    assert "realrun" not in yaml.safe_load((CLI_CONF_DIR / "realrun.yaml").read_text())
    with initialize_config_module(version_base=None, config_module="conf.cli"):
        composed = dict(compose(config_name="realrun", overrides=["realrun.kv_tokens=8"])["realrun"])
    assert composed.pop("layers") is None  # realrun.__main__'s own: the first N layers
    assert composed == {**{k: v for k, v in asdict(RealOptions()).items() if k != "seed"}, "kv_tokens": 8}


def test_an_engine_without_options_serves_as_simconfig_defaults():
    """SimOptions (the engines' own, used where a caller gives none: realrun's executor) repeats
    SimConfig's serving defaults; they must agree until one is made from the other."""
    from sim.api import replay_options
    from sim.engine import SimOptions

    assert replay_options(SimConfig()) == SimOptions()
