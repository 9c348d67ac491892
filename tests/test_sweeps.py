"""Sweeps: stable directories, skipping complete runs on restart, the local, Slurm and Optuna configs."""
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import get_class

from conf import CLI_CONF_DIR
from policies import available, make_policy, policy_class
from sim.api import simulate
from sim.cli import CLI_ONLY
from sim.config import SimConfig
from sim.report import write_run
from sim.sweep import check_objective, completed_metrics, objective_value, sweep_dir_name, with_stable_sweep_dir
from traces.errors import UserError

TUNE_CONFIGS = sorted(p.stem for p in (CLI_CONF_DIR / "tune").glob("*.yaml"))
README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def sim(cwd, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "sim", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def hydra_config(*overrides):
    with initialize_config_module(config_module="conf.cli", version_base=None):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def test_a_sweep_is_named_by_its_overrides_in_any_order():
    one = ["-m", "+policy=lru,belady", "+budget=2GB,6GB", "max_requests=1", "progress=false", "hydra.verbose=true"]
    other = ["max_requests=1", "+budget=2GB,6GB", "-m", "skip_complete=false", "+policy=lru,belady"]
    assert sweep_dir_name(one) == sweep_dir_name(other) == "budget=2GB,6GB_max_requests=1_policy=lru,belady"
    assert with_stable_sweep_dir(one)[-1] == \
        "hydra.sweep.dir='multirun/budget=2GB,6GB_max_requests=1_policy=lru,belady'"
    assert sweep_dir_name(["-m"]) == "defaults"


def test_a_sweep_name_is_a_safe_directory_name_and_names_stay_apart():
    path_a, path_b = sweep_dir_name(["trace=/data/a b"]), sweep_dir_name(["trace=/data/a_b"])
    assert "/" not in path_a and " " not in path_a and path_a != path_b
    long = sweep_dir_name([f"+budget={','.join(f'{n}GB' for n in range(1, 80))}"])
    assert len(long) <= 110


def test_the_readme_gathers_the_directory_its_sweep_lands_in():
    lines = [line.split("#")[0].split() for line in README.splitlines()]
    results = next(words for words in lines if words[:3] == ["python", "-m", "sim.results"])
    sweep = next(words for words in lines if words[:4] == ["python", "-m", "sim", "-m"] and "all_resident" in words[4])
    assert results[3] == f"multirun/{sweep_dir_name(sweep[3:])}"


def test_the_sweep_directory_is_left_alone_when_given_or_not_sweeping():
    given = ["-m", "+policy=lru", "hydra.sweep.dir=mine"]
    assert with_stable_sweep_dir(given) == given
    assert with_stable_sweep_dir(["+policy=lru"]) == ["+policy=lru"]


def test_run_directories_leave_out_exactly_the_cli_only_keys():
    excluded = hydra_config().hydra.job.config.override_dirname.exclude_keys
    assert set(excluded) == CLI_ONLY


def test_a_complete_run_is_recognised_only_with_its_own_config(tmp_path):
    cfg = SimConfig(policy="lru", budget="2GB", max_requests=1)
    write_run(simulate(cfg), tmp_path)
    done = completed_metrics(tmp_path, cfg.to_dict())
    assert done is not None and done["policy"] == "lru" and done["budget_bytes"] == 2 * 10**9
    assert completed_metrics(tmp_path, SimConfig(policy="lru", budget="2GB", max_requests=1, seed=1).to_dict()) is None
    (tmp_path / "metrics.json").write_text("{half")
    assert completed_metrics(tmp_path, cfg.to_dict()) is None
    (tmp_path / "metrics.json").unlink()
    assert completed_metrics(tmp_path, cfg.to_dict()) is None


def test_the_objective_is_a_numeric_metric():
    assert objective_value({"tpot_mean_s": 0.25}, "tpot_mean_s") == 0.25
    assert objective_value({"trace_token_reuse": None}, "trace_token_reuse") != objective_value({}, "trace_token_reuse")
    for bad in ("policy", "policy_info", "nope"):
        with pytest.raises(UserError, match=f"objective '{bad}' is not a numeric metric; use one of .*hit_rate"):
            check_objective(bad)


def test_a_sweep_runs_in_parallel_by_default_and_a_restart_skips_complete_runs(tmp_path):
    first = sim(tmp_path, "-m", "+policy=lru", "+budget=2GB,8GB", "max_requests=1", "progress=false")
    assert first.returncode == 0, first.stderr
    assert "2 runs in multirun/budget=2GB,8GB_max_requests=1_policy=lru" in first.stdout  # one summary table
    sweep = tmp_path / "multirun" / "budget=2GB,8GB_max_requests=1_policy=lru"
    runs = {p.parent.name: p for p in sweep.glob("*/metrics.json")}
    assert sorted(runs) == ["+budget=2GB,+policy=lru,max_requests=1", "+budget=8GB,+policy=lru,max_requests=1"]
    kept, interrupted = runs["+budget=2GB,+policy=lru,max_requests=1"], runs["+budget=8GB,+policy=lru,max_requests=1"]
    kept_stamp = kept.stat().st_mtime_ns
    interrupted.unlink()  # as if the sweep had stopped before this run finished

    again = sim(tmp_path, "-m", "max_requests=1", "+budget=2GB,8GB", "+policy=lru", "progress=true")
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("skipped, already complete") == 1
    assert f"skipped, already complete: {kept.parent}" in again.stdout
    assert kept.stat().st_mtime_ns == kept_stamp and json.loads(interrupted.read_text())["budget_bytes"] == 8 * 10**9
    assert "req/s" not in again.stderr  # runs side by side: one bar for the sweep, not one per run


def test_a_changed_config_is_run_again_not_skipped(tmp_path):
    args = ["-m", "+policy=lru", "+budget=2GB", "max_requests=1", "progress=false", "hydra/launcher=basic",
            f"hydra.sweep.dir={tmp_path / 's'}"]
    assert sim(tmp_path, *args).returncode == 0
    assert "skipped" in sim(tmp_path, *args).stdout
    rerun = sim(tmp_path, *args, "skip_complete=false")
    assert rerun.returncode == 0 and "skipped, already complete" not in rerun.stdout and "1 runs in" in rerun.stdout


def test_optuna_tunes_a_policy_knob_and_a_repeated_trial_is_skipped(tmp_path):
    done = sim(tmp_path, "-m", "+tune=lru", "max_requests=1", "progress=false", "hydra/launcher=basic",
               "hydra.sweeper.n_trials=4")
    assert done.returncode == 0, done.stderr
    sweep = tmp_path / "multirun" / "max_requests=1_tune=lru"
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    trials = [json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")]
    scopes = {json.loads((p.parent / "run_config.json").read_text())["policy_params"]["scope"]
              for p in sweep.glob("*/metrics.json")}
    assert scopes == {"per_layer", "global"}  # two choices, four trials: two of them repeats
    assert "skipped, already complete" in done.stdout
    assert best["best_value"] == pytest.approx(min(t["tpot_mean_s"] for t in trials))
    assert best["best_params"]["policy.scope"] in scopes


@pytest.mark.parametrize("name", TUNE_CONFIGS)
def test_tune_configs_compose_and_name_real_knobs(name):
    """finemoe and moepic are checked once their policies are registered."""
    config = yaml.safe_load((CLI_CONF_DIR / "tune" / f"{name}.yaml").read_text())
    policy = next(entry["/policy"] for entry in config["defaults"] if "/policy" in entry)
    if policy not in available():
        pytest.skip(f"policy '{policy}' is not registered on this branch")
    cfg = hydra_config(f"+tune={name}")
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.policy.name == policy
    check_objective(cfg.objective)
    accepted = set(inspect.signature(policy_class(policy).__init__).parameters) - {"self"}
    for key, space in cfg.hydra.sweeper.params.items():
        knob = key.removeprefix("policy.")
        assert key.startswith("policy.") and knob in accepted, f"{name}: unknown knob {key}"
        for value in search_space_ends(f"{key}={space}"):
            make_policy(policy, **{knob: value})  # the ends of the search space are valid knobs


def search_space_ends(override: str) -> list:
    """The choices of a choice(...), the two ends of an interval(...)."""
    parsed = OverridesParser.create().parse_override(override)
    if parsed.is_choice_sweep():
        return list(parsed.sweep_iterator())
    return [parsed.value().start, parsed.value().end]


def test_the_slurm_launcher_composes_with_documented_settings():
    launcher = hydra_config("hydra/launcher=slurm").hydra.launcher
    assert get_class(launcher._target_).__name__ == "SlurmLauncher"
    assert launcher.cpus_per_task == 1 and launcher.gpus_per_node == 0 and launcher.timeout_min == 60
    assert launcher.submitit_folder.endswith("/.submitit/%j")  # beside the sweep, on the shared filesystem
    local = hydra_config().hydra.launcher
    assert get_class(local._target_).__name__ == "JoblibLauncher" and local.n_jobs == -1


def test_submitit_runs_the_task_as_it_would_on_slurm(tmp_path):
    """submitit's local executor pickles and runs the task as its Slurm executor does."""
    done = sim(tmp_path, "-m", "hydra/launcher=submitit_local", "+policy=lru", "+budget=2GB", "max_requests=1",
               "progress=false", f"hydra.sweep.dir={tmp_path / 's'}")
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "s").glob("*/metrics.json"))) == 1


def test_a_complete_run_is_done_again_when_its_trace_or_the_code_changed(tmp_path):
    import shutil

    from traces.defaults import resolve_trace

    trace = tmp_path / "trace"
    shutil.copytree(resolve_trace("mixtral-8x7b-gsm8k"), trace)
    cfg = SimConfig(trace=str(trace), policy="lru", budget="128experts", max_requests=1)
    write_run(simulate(cfg), tmp_path / "run")
    assert completed_metrics(tmp_path / "run", cfg.to_dict()) is not None
    made_by = tmp_path / "run" / "provenance.json"
    stored = json.loads(made_by.read_text())
    made_by.write_text(json.dumps({**stored, "code_version": "0.0.1+src.older"}))
    assert completed_metrics(tmp_path / "run", cfg.to_dict()) is None  # made by other code
    made_by.write_text(json.dumps(stored))
    assert completed_metrics(tmp_path / "run", cfg.to_dict()) is not None
    (trace / "meta.json").write_text((trace / "meta.json").read_text() + "\n")  # same name, other content
    assert completed_metrics(tmp_path / "run", cfg.to_dict()) is None
