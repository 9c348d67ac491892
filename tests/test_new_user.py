"""What a new user runs first (issue 24): every policy from one command, a measured default machine,
Slurm refused in one line where there is none, and the same numbers from the same command."""
import json
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
from conftest import repo_env
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from policies import available, policy_class
from sim.cli import register
from sim.config import DEFAULT_HARDWARE, DEFAULT_TRAIN_FRACTION, SimConfig
from sim.profiles import load_hardware
from sim.sweep_summary import planned_runs
from traces import load_trace
from traces.defaults import resolve_trace
from traces.model_spec import load_model_spec


def sim(cwd, *args, env=None):
    return subprocess.run([sys.executable, "-m", "sim", *args, "progress=false"], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=env or repo_env())


def test_promoe_runs_from_the_readme_command_with_the_default_training_split(tmp_path):
    done = sim(tmp_path, "+policy=promoe", "+budget=6GB", "max_requests=2", f"hydra.run.dir={tmp_path}/run")
    assert done.returncode == 0, done.stderr
    stored = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert stored["train_fraction"] == DEFAULT_TRAIN_FRACTION == 0.25
    assert "not measured (train_fraction=0.25" in " ".join(done.stdout.split())
    trace = load_trace(resolve_trace("default"))
    n_train = int(trace.num_requests * DEFAULT_TRAIN_FRACTION)
    measured = pd.read_csv(tmp_path / "run" / "requests.csv")["request_id"].astype(str).tolist()
    # The measured requests are the two right after the training split, none of the training ones.
    assert measured == trace.requests["request_id"].iloc[n_train:n_train + 2].astype(str).tolist()
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["policy_info"]["train_requests"] == n_train


def test_train_fraction_overrides_the_default_and_other_policies_train_on_nothing(tmp_path):
    done = sim(tmp_path, "-m", "+policy=promoe,lru", "+budget=6GB", "max_requests=1", "train_fraction=0.5,null",
               "hydra/launcher=basic", f"hydra.sweep.dir={tmp_path}/sweep")
    assert done.returncode == 0, done.stderr
    fractions = sorted((json.loads(p.read_text())["policy"], json.loads(p.read_text())["train_fraction"])
                       for p in (tmp_path / "sweep").glob("*/run_config.json"))
    assert fractions == [("lru", 0.0), ("lru", 0.5), ("promoe", 0.25), ("promoe", 0.5)]


def test_every_policy_runs_from_the_one_command(tmp_path):
    # the shipped policies only: other tests register their own (the README's example) in this process
    names = [n for n in available() if policy_class(n).__module__.startswith("policies.")]
    done = sim(tmp_path, "-m", f"+policy={','.join(names)}", "+budget=6GB", "max_requests=1", "hydra/launcher=basic",
               f"hydra.sweep.dir={tmp_path}/sweep")
    assert done.returncode == 0, done.stderr
    ran = sorted(json.loads(p.read_text())["policy"] for p in (tmp_path / "sweep").glob("*/metrics.json"))
    assert ran == sorted(names) and len(names) >= 10


@pytest.mark.skipif(shutil.which("srun") is not None, reason="this machine has Slurm")
def test_slurm_launcher_without_slurm_is_one_line_and_status_2(tmp_path):
    env = {**repo_env(), "PATH": os.path.dirname(sys.executable)}
    done = sim(tmp_path, "-m", "hydra/launcher=slurm", "+policy=lru,belady", env=env)
    assert done.returncode == 2
    err = done.stderr.strip()
    assert err.startswith("error: hydra/launcher=slurm: no Slurm on this machine") and "\n" not in err, err
    assert "Traceback" not in done.stderr and "srun" in err
    assert not any(tmp_path.iterdir())  # nothing written


def test_the_default_hardware_is_a_measured_profile():
    register()
    with initialize_config_module(version_base=None, config_module="conf.cli"):
        cfg = compose(config_name="config")
    assert cfg.hardware == SimConfig().hardware == DEFAULT_HARDWARE == "h200-measured"
    hardware = load_hardware(DEFAULT_HARDWARE)
    assert hardware.host_link.measured is not None  # a measured copy curve, not latency + bandwidth
    assert "realrun.calibrate" in hardware.origin
    # Every model profile whose shape the calibration knows is charged measured compute times:
    # a run on the default (gpt-oss) trace or a Mixtral one prints no roofline fallback.
    for model in ("mixtral-8x7b", "qwen1.5-moe", "phi-3.5-moe", "gpt-oss-20b"):
        assert all(hardware.measured_for(load_model_spec(model)).values()), model
    # The default trace is gpt-oss-20b's: its runs take that model's own after-wait and host times.
    gpt_oss = hardware.for_model("gpt-oss-20b")
    assert gpt_oss.after_wait != hardware.after_wait
    assert gpt_oss.policy_host_time("finemoe") != hardware.policy_host_time("finemoe")


def test_a_sweep_ends_with_one_table_and_matches_single_runs_byte_for_byte(tmp_path):
    """One progress bar and one summary table for a sweep (run in joblib's worker processes); the
    same config run alone, twice, in fresh processes writes the same metrics.json, byte for byte."""
    sweep = tmp_path / "sweep"
    done = sim(tmp_path, "-m", "+policy=lru,belady", "+budget=2GB", "max_requests=1", "hydra.launcher.n_jobs=2",
               f"hydra.sweep.dir={sweep}")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "2 runs in" in out and "TPOT mean (ms)" in out and "host->GPU (GB)" in out
    rows = [line for line in out.splitlines() if line.startswith("│ ")]
    assert sorted(r.split("│")[1].strip() for r in rows) == ["belady", "lru"]
    assert f"python -m sim.results {sweep}" in out
    assert "results:" not in out and "expert hit rate" not in out  # no per-run tables
    alone = []
    for i in range(2):
        single = sim(tmp_path, "+policy=lru", "+budget=2GB", "max_requests=1", f"hydra.run.dir={tmp_path}/run{i}")
        assert single.returncode == 0, single.stderr
        assert "expert hit rate" in single.stdout  # a single run keeps its table
        alone.append((tmp_path / f"run{i}" / "metrics.json").read_bytes())
    in_sweep = (sweep / "+budget=2GB,+policy=lru,max_requests=1" / "metrics.json").read_bytes()
    assert alone[0] == alone[1] == in_sweep


def test_the_sweep_bar_counts_every_combination_or_the_trials():
    task = ["+policy=lru,belady,finemoe", "+budget=2GB,4GB", "seed=1"]
    assert planned_runs(OmegaConf.create({"hydra": {"sweeper": {}, "overrides": {"task": task}}})) == 6
    assert planned_runs(OmegaConf.create({"hydra": {"sweeper": {"n_trials": 10}, "overrides": {"task": task}}})) == 10
