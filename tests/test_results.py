"""python -m sim.results: one row per run, knobs and metrics as columns, the standard figures."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sim.api import simulate
from sim.config import SimConfig
from sim.plots import axis, layer_hit_rate_heatmap, metric_vs_budget
from sim.report import write_run
from sim.results import (
    by_budget, gather, knob_columns, load_layer_results, load_results, series_columns, series_labels,
)
from traces import load_trace
from traces.defaults import resolve_trace
from traces.model_spec import load_model_spec
from traces.synthetic import SyntheticParams, generate_synthetic

FIGURES = ["hit_rate_vs_budget", "tpot_vs_budget", "ttft_vs_budget", "layer_hit_rate_heatmap", "bytes_moved_vs_budget"]


def results_cli(*args):
    return subprocess.run([sys.executable, "-m", "sim.results", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_one_row_per_run_with_every_knob_and_metric(small_sweep):
    results = gather(small_sweep, progress=False)
    runs = results.runs
    assert len(runs) == 8 and not results.incomplete
    assert runs["run_dir"].is_unique
    assert knob_columns(runs)[:6] == ["trace", "trace_name", "dataset", "policy", "policy_scope", "budget"]
    assert set(runs["dataset"]) == {"+".join(sorted(set(load_trace(resolve_trace("default")).requests["dataset"])))}
    assert {Path(t).name for t in runs["trace"]} == {resolve_trace("default").name}
    assert sorted(runs["budget_gb"].unique()) == [2.0, 8.0] and set(runs["max_requests"]) == {1}
    for _, row in runs.iterrows():
        metrics = json.loads((small_sweep / row["run_dir"] / "metrics.json").read_text())
        config = json.loads((small_sweep / row["run_dir"] / "run_config.json").read_text())
        assert row["policy_scope"] == config["policy_params"]["scope"] and row["budget"] == config["budget"]
        assert row["hit_rate"] == metrics["hit_rate"] and row["tpot_p99_s"] == metrics["tpot_p99_s"]
        assert json.loads(row["policy_info"]) == metrics["policy_info"]


def test_the_layer_table_adds_up_to_the_run_table(small_sweep):
    results = gather(small_sweep, progress=False)
    layers = results.layers
    n = load_trace(resolve_trace("default")).model.num_layers  # 24 on the gpt-oss default
    assert len(layers) == 8 * n and set(layers["layer"]) == set(range(n))
    totals = layers.groupby("run_dir")[["hits", "expert_uses", "bytes_h2d"]].sum()
    runs = results.runs.set_index("run_dir")
    assert np.allclose(totals["hits"] / totals["expert_uses"], runs.loc[totals.index, "hit_rate"])
    assert np.allclose(totals["bytes_h2d"], runs.loc[totals.index, "bytes_h2d"])
    assert {"policy", "policy_scope", "budget_gb"} <= set(layers.columns)


def test_series_are_the_policy_and_the_knobs_that_vary(small_sweep):
    runs = gather(small_sweep, progress=False).runs
    assert series_columns(runs) == ["policy", "policy_scope"]
    assert set(series_labels(runs, series_columns(runs))) == {
        "lru scope=per_layer", "lru scope=global", "belady scope=per_layer", "belady scope=global"}
    table = by_budget(runs, "hit_rate")
    assert table.shape == (4, 2) and list(table.columns) == [2.0, 8.0]
    belady, lru = table.loc["belady scope=per_layer"], table.loc["lru scope=per_layer"]
    assert (belady >= lru).all() and (table[8.0] >= table[2.0]).all()  # the bound, and more memory helps


def test_the_budget_axis_is_the_budget_asked_for(tmp_path):
    # all_resident ignores the budget and keeps every expert: budget_bytes says so, budget_gb keeps the knob.
    for policy in ("all_resident", "lru"):
        write_run(simulate(SimConfig(policy=policy, budget="2GB", max_requests=1)), tmp_path / policy)
    runs = gather(tmp_path, progress=False).runs.set_index("policy")
    assert runs.loc["all_resident", "budget_gb"] == runs.loc["lru", "budget_gb"] == 2.0
    assert runs.loc["all_resident", "budget_bytes"] > runs.loc["lru", "budget_bytes"] == 2 * 10**9
    assert series_columns(runs.reset_index()) == ["policy"]  # a knob of lru alone does not vary


def test_each_model_and_dataset_gets_a_panel_and_each_policy_a_line(tmp_path):
    model = load_model_spec("mixtral-8x7b")
    synthetic = generate_synthetic(tmp_path / "syn", model, SyntheticParams(requests=2, output_tokens=(4, 8), seed=1))
    for trace in ("mixtral-8x7b-gsm8k", str(synthetic)):
        for policy in ("lru", "belady"):
            for budget in ("2GB", "8GB"):
                cfg = SimConfig(trace=trace, policy=policy, budget=budget, max_requests=1)
                write_run(simulate(cfg), tmp_path / "runs" / f"{Path(trace).name}-{policy}-{budget}")
    results = gather(tmp_path / "runs", progress=False)
    assert set(results.runs["dataset"]) == {"gsm8k", "synthetic"}
    fig = metric_vs_budget(results.runs, "hit_rate")
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert sorted(ax.get_title() for ax in panels) == ["gsm8k", "synthetic"]  # the facets that vary
    assert all(sorted(line.get_label() for line in ax.get_lines()) == ["belady", "lru"] for ax in panels)
    assert all(ax.get_xlabel() == "expert budget (GB)" and ax.get_ylabel() == "expert hit rate (%)" for ax in panels)
    heatmap = layer_hit_rate_heatmap(results.layers)
    assert len([ax for ax in heatmap.axes if ax.get_images()]) == 4  # 2 policies x 2 datasets


def test_the_cli_writes_tables_and_figures_that_read_back(small_sweep, tmp_path):
    done = results_cli(small_sweep, "--out", tmp_path)
    assert done.returncode == 0, done.stderr
    assert "expert hit rate, 8 runs" in done.stdout and "lru scope=global" in done.stdout
    runs, from_csv = load_results(tmp_path / "results.parquet"), load_results(tmp_path / "results.csv")
    assert len(runs) == len(from_csv) == 8
    gathered = load_results(small_sweep).sort_values("run_dir", ignore_index=True)
    pd.testing.assert_frame_equal(runs.sort_values("run_dir", ignore_index=True), gathered)
    assert len(load_layer_results(tmp_path / "layer_results.parquet")) == 8 * load_trace(resolve_trace("default")).model.num_layers
    for name in FIGURES:
        assert (tmp_path / "figures" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "<svg" in (tmp_path / "figures" / f"{name}.svg").read_text()[:1000]
    assert not list(tmp_path.rglob(".*tmp*"))  # no temporary file left behind


def test_incomplete_runs_are_counted_not_gathered(small_sweep, tmp_path):
    subprocess.run(["cp", "-r", str(small_sweep), str(tmp_path / "s")], check=True)
    interrupted = next((tmp_path / "s").glob("*/metrics.json"))
    interrupted.unlink()
    results = gather(tmp_path / "s", progress=False)
    assert len(results.runs) == 7 and results.incomplete == [interrupted.parent]
    done = results_cli(tmp_path / "s", "--no-figures")
    assert done.returncode == 0 and "1 incomplete run(s)" in done.stdout
    assert not (tmp_path / "s" / "figures").exists()


@pytest.mark.parametrize("make, message", [
    (lambda tmp: tmp / "nowhere", "no such directory"),
    (lambda tmp: tmp, "no complete run (no metrics.json) under it"),
])
def test_bad_input_gets_one_line(tmp_path, make, message):
    done = results_cli(make(tmp_path))
    err = done.stderr.strip()
    assert done.returncode == 2 and err.startswith("error: ") and message in err and "\n" not in err, err


def test_axes_name_their_units():
    assert axis("tpot_p50_s") == ("tpot p50 (ms)", 1e3)
    assert axis("demand_bytes_h2d") == ("demand bytes h2d (GB)", 1e-9)
    assert axis("miss_rate") == ("miss rate (%)", 100.0)
    assert axis("hit_rate")[0] == "expert hit rate (%)"
