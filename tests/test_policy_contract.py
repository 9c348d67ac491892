"""Every registered policy, through the same contract: budget, determinism, sane metrics, config."""
import pytest
import yaml
from conftest import trace_expert_uses

from conf import CLI_CONF_DIR
from policies import available, policy_class
from sim.api import prepare, simulate
from sim.config import SimConfig
from traces import load_trace
from traces.model_spec import load_model_spec
from traces.synthetic import SyntheticParams, generate_synthetic

POLICIES = available()


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    params = SyntheticParams(requests=6, prompt_tokens=(4, 12), output_tokens=(4, 12), seed=2)
    return load_trace(generate_synthetic(tmp_path_factory.mktemp("t") / "syn", load_model_spec("mixtral-8x7b"), params))


def test_every_policy_has_a_config_named_after_it():
    for name in POLICIES:
        path = CLI_CONF_DIR / "policy" / f"{name}.yaml"
        assert path.is_file(), f"conf/cli/policy/{name}.yaml missing"
        assert yaml.safe_load(path.read_text())["name"] == name


@pytest.mark.parametrize("name", POLICIES)
def test_a_policy_config_lists_every_knob_with_its_init_default(name):
    """conf/cli/policy/NAME.yaml repeats the knobs for Hydra (+policy=NAME, policy.KNOB=...): the
    defaults of __init__ are the ones that count, and the YAML must say the same."""
    import inspect

    listed = yaml.safe_load((CLI_CONF_DIR / "policy" / f"{name}.yaml").read_text())
    listed.pop("name")
    knobs = {k: p.default for k, p in inspect.signature(policy_class(name).__init__).parameters.items()
             if k != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    assert listed == knobs


@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("budget", ["3experts", "64experts", "6GB"])
def test_contract(trace, name, budget):
    cfg = SimConfig(trace=str(trace.path), policy=name, budget=budget, train_fraction=0.34, seed=1)
    first = simulate(cfg, trace=trace).metrics
    assert first == simulate(cfg, trace=trace).metrics  # deterministic
    if not policy_class(name).ignores_budget:
        assert first.gpu_mem_high_water_bytes <= first.budget_bytes
    assert first.expert_uses == trace_expert_uses(trace, prepare(cfg, trace).replay)  # every use counted, once
    assert 0.0 <= first.hit_rate <= 1.0
    assert first.ttft_mean_s > 0 and first.tpot_mean_s > 0
    assert first.requests == 4
