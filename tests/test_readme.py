"""The README's promises: its example policy runs, and CI runs exactly its test command."""
import importlib
import importlib.util
import re
import shlex
from pathlib import Path

import yaml

from policies.registry import available, policy_class, scoped
from sim.api import simulate
from sim.config import SimConfig

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def test_ci_runs_exactly_the_readme_test_command():
    test_command = next(line for block in code_blocks("bash") for line in block.splitlines() if "pytest" in line)
    ci_lines = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert test_command in ci_lines


def test_the_example_policy_in_the_readme_runs():
    source = next(block for block in code_blocks("python") if '@register("frequent")' in block)
    with scoped():  # registered for this test only: later tests see the shipped policies
        exec(compile(source, "README.md:frequent", "exec"), {})  # noqa: S102 - the README's own example
        config = yaml.safe_load(next(block for block in code_blocks("yaml") if "name: frequent" in block))
        assert policy_class(config.pop("name")).__name__ == "Frequent"
        # The first 10 requests of the default trace: enough to prefetch, a fraction of the time.
        metrics = simulate(SimConfig(policy="frequent", policy_params={"width": 2}, budget="64experts",
                                     max_requests=10, policy_host="lru")).metrics
    assert "frequent" not in available()
    assert metrics.prefetch_hit_rate > 0
    assert metrics.gpu_mem_high_water_bytes <= metrics.budget_bytes


def readme_commands() -> list[list[str]]:
    """Every `python -m MODULE ...` line of the README's bash blocks, as arguments (continuations joined)."""
    commands = []
    for block in code_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part.split("#")[0])
                if words[:2] == ["python", "-m"] and len(words) > 2 and words[2] != "pytest":
                    commands.append(words[2:])
    return commands


PLACEHOLDER = re.compile(r"^(?P<key>[\w.+~/]+=)?[A-Z][A-Z_]*(\.jsonl|\.\.\.)?$")  # PATH, OUT_DIR, SRC.jsonl, key=DIR


def concrete(args: list[str]) -> list[str]:
    """The arguments with the README's placeholders (PATH, OUT_DIR, key=DIR) given a value and its
    optional parts ([--prompts FILE]) included, so that every flag and key is checked."""
    return [PLACEHOLDER.sub(lambda m: f"{m['key'] or ''}x", arg.strip("[]")) for arg in args]


def first_values(args: list[str]) -> list[str]:
    """A sweep's overrides at their first value: one run of it, which compose can build."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    out = []
    for arg in (a for a in args if not a.startswith("-")):
        override = parser.parse_override(arg)
        value = next(iter(override.sweep_string_iterator())) if override.is_sweep_override() else None
        out.append(arg if value is None else f"{override.get_key_element()}={value}")
    return out


def test_every_readme_command_parses_with_its_real_parser():
    """A renamed flag, setting, knob or config in any README command line fails here: sim's lines are
    composed by Hydra against conf/cli (without running) into a SimConfig; the other commands' lines
    go through their own argparse parser, and into their config dataclass where they have one."""
    from hydra import compose, initialize_config_module
    from omegaconf import open_dict

    from sim.cli import check_arguments, config_from_hydra
    from traces.cli import ConfigParser

    commands = readme_commands()
    assert len(commands) > 20
    checked = set()
    for module, *args in commands:
        assert importlib.util.find_spec(module) is not None, module
        args = concrete(args)
        if module == "sim":
            check_arguments(args)
            with initialize_config_module(version_base=None, config_module="conf.cli"):
                cfg = compose(config_name="config", overrides=first_values(args), return_hydra_config=True)
            with open_dict(cfg):
                del cfg["hydra"]  # resolved only when a run starts (its output directory)
            config_from_hydra(cfg)  # the composed settings, typed as SimConfig types them
        else:
            package = importlib.util.find_spec(module).submodule_search_locations is not None
            parser = importlib.import_module(f"{module}.__main__" if package else module).build_parser()  # as -m runs it
            parser.parse_config(args) if isinstance(parser, ConfigParser) else parser.parse_args(args)
        checked.add(module)
    assert {"sim", "sim.reproduce", "traces.convert", "traces.synth", "traces.compact"} <= checked


def test_the_readme_states_how_many_runs_sim_reproduce_plans_today():
    from policies import available
    from sim.reproduce import BUDGETS, SETUPS, plan_runs, shipped_traces
    from traces.defaults import resolve_trace
    from traces.shared import shared_trace

    stated = int(re.search(r"At today's defaults that is (\d+) runs", " ".join(README.split()))[1])
    defaults = {a.dest: a.default for a in importlib.import_module("sim.reproduce").build_parser()._actions}
    traces = [shared_trace(resolve_trace(name)) for name in shipped_traces()]
    policies = [p for p in available() if policy_class(p).__module__.startswith("policies.")]
    runs = plan_runs(traces, policies, list(BUDGETS), list(SETUPS), defaults["budget_scope"], defaults["train_requests"],
                     defaults["replay_requests"], defaults["seed"], formats=defaults["formats"].split(","))
    assert len(runs) == stated


def test_the_readme_names_the_default_machine_and_training_split_the_code_uses():
    from sim.config import DEFAULT_HARDWARE, DEFAULT_TRAIN_FRACTION

    text = " ".join(README.split())
    assert f"The default hardware is `{DEFAULT_HARDWARE}` (`sim.config.DEFAULT_HARDWARE`)" in text
    assert DEFAULT_TRAIN_FRACTION == 0.25 and "trains on the trace's first quarter of requests" in text
