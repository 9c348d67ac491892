"""Runs started at the same moment never share a directory, so none loses or mixes results."""
import json
import re
import subprocess
import sys
from conftest import repo_env
from pathlib import Path


def test_concurrent_runs_each_keep_their_own_results(tmp_path):
    seeds = range(4)
    procs = [subprocess.Popen([sys.executable, "-m", "sim", "+policy=lru", "+budget=2GB", "arrival=poisson",
                               f"seed={seed}", "max_requests=2", "progress=false"],
                              cwd=tmp_path, env=repo_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in seeds]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
    paths = [Path(re.search(r"^results: (.+)$", out, re.M).group(1)) for out, _ in outputs]
    assert len(set(paths)) == len(paths), "two runs printed the same results path"
    for seed, path in zip(seeds, paths):
        assert json.loads((path / "metrics.json").read_text())["seed"] == seed
        assert json.loads((path / "run_config.json").read_text())["seed"] == seed
        assert f"seed={seed}" in (path / ".hydra" / "overrides.yaml").read_text()
    assert sorted(p.parent for p in (tmp_path / "outputs").rglob("metrics.json")) == sorted(paths)


def test_a_run_directory_another_process_is_writing_is_refused(tmp_path):
    import os

    from traces.atomic import HOST

    held = tmp_path / "run"
    held.mkdir()
    (held / ".running").write_text(f"{os.getpid()}.{HOST}")  # this test's process holds it
    (held / "requests.csv").write_text("theirs")
    done = subprocess.run([sys.executable, "-m", "sim", "max_requests=1", "progress=false", f"hydra.run.dir={held}"],
                          cwd=tmp_path, env=repo_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert f"{held}: another run (process {os.getpid()} on {HOST}) is writing this directory" in done.stderr
    assert (held / "requests.csv").read_text() == "theirs" and not (held / "metrics.json").exists()
    (held / ".running").write_text(f"{2**22 + 12345}.{HOST}")  # a holder that died: taken over
    done = subprocess.run([sys.executable, "-m", "sim", "max_requests=1", "progress=false", f"hydra.run.dir={held}"],
                          cwd=tmp_path, env=repo_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (held / "metrics.json").is_file() and not (held / ".running").exists()
