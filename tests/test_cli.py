"""`python -m sim` as a user runs it: the verbatim commands, sweeps, and one-line errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
METRIC_KEYS = {"hit_rate", "ttft_mean_s", "tpot_mean_s", "tpot_p99_s", "bytes_h2d", "e2e_p50_s", "stall_s",
               "gpu_mem_high_water_bytes", "wasted_prefetch_bytes", "trace_origin", "trace_token_reuse"}


def sim(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "sim", *args, f"hydra.run.dir={tmp_path}/run",
                           f"hydra.sweep.dir={tmp_path}/sweep", "progress=false"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)


def test_the_readme_command_writes_metrics_and_prints_the_trace_origin(tmp_path):
    done = sim(tmp_path, "+policy=lru", "+budget=6GB")
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics)
    assert metrics["policy"] == "lru" and metrics["budget_bytes"] == 6 * 10**9
    for name in ("requests.csv", "layers.csv", "run_config.json"):
        assert (tmp_path / "run" / name).is_file()
    assert "routing from" in done.stdout and "reuse" in done.stdout


def test_sweep_runs_every_combination(tmp_path):
    done = sim(tmp_path, "-m", "+policy=lru,belady", "+budget=2GB,128experts", "max_requests=1")
    assert done.returncode == 0, done.stderr
    runs = sorted((tmp_path / "sweep").glob("*/metrics.json"))
    assert len(runs) == 4
    policies = sorted(json.loads(p.read_text())["policy"] for p in runs)
    assert policies == ["belady", "belady", "lru", "lru"]


@pytest.mark.parametrize("args, message", [
    (["+policy=nope"], "unknown policy 'nope'; known policies: "),
    (["+budget=6XB"], "unknown unit 'XB'"),
    (["+budget=10MB"], "below one expert"),
    (["trace=/no/such/trace"], "no such directory"),
    (["+policy=lru", "policy.scope=sideways"], "scope 'sideways' unknown"),
    (["model=qwen1.5-moe"], "pick a model of the trace's shape"),
    (["+policy=lru", "policy_host=fiddler"], "policy_host=fiddler: hardware 'h200-measured' measured no host time"),
])
def test_bad_input_gets_one_line_and_no_output(tmp_path, args, message):
    done = sim(tmp_path, *args)
    assert done.returncode == 2
    err = done.stderr.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_corrupt_trace_is_named(tmp_path):
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(REPO / "traces" / "data" / "mixtral-8x7b-gsm8k"), str(broken)], check=True)
    data = (broken / "experts.npy").read_bytes()
    (broken / "experts.npy").write_bytes(data[: len(data) // 2])
    done = sim(tmp_path, f"trace={broken}")
    assert done.returncode == 2 and "experts.npy: truncated or corrupt" in done.stderr
