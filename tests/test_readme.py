"""The README's promises: its example policy runs, and CI runs exactly its test command."""
import re
from pathlib import Path

import yaml

from policies.registry import available, policy_class, scoped
from sim.api import simulate
from sim.config import SimConfig

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_ci_runs_exactly_the_readme_test_command():
    test_command = next(line for block in code_blocks("bash") for line in block.splitlines() if "pytest" in line)
    ci_lines = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert test_command in ci_lines


def test_the_example_policy_in_the_readme_runs():
    source = next(block for block in code_blocks("python") if '@register("frequent")' in block)
    with scoped():  # registered for this test only: later tests see the shipped policies
        exec(compile(source, "README.md:frequent", "exec"), {})
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
    import shlex

    commands = []
    for block in code_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part.split("#")[0])
                if words[:2] == ["python", "-m"] and len(words) > 2 and words[2] != "pytest":
                    commands.append(words[2:])
    return commands


def test_every_readme_command_names_a_module_and_sim_accepts_its_settings():
    import importlib.util

    from sim.cli import check_arguments

    commands = readme_commands()
    assert len(commands) > 20
    for module, *args in commands:
        assert importlib.util.find_spec(module) is not None, module
        if module == "sim":  # settings, policies and knobs as the pre-Hydra check sees them
            check_arguments([a for a in args if not a.isupper() and "=PATH" not in a and "=NAME" not in a
                             and "=DIR" not in a])
