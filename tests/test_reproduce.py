"""python -m sim.reproduce: every policy over a trace, the paper's budgets, the comparison table."""
import dataclasses

import pandas as pd
import pytest

from sim.reproduce import budget_bytes, main
from traces.model_spec import load_model_spec
from traces.synthetic import SyntheticParams, generate_synthetic


def test_budgets_are_the_papers_share_of_all_expert_bytes():
    mixtral = load_model_spec("mixtral-8x7b")
    assert budget_bytes("6GB", mixtral) == (6 * 10**9, pytest.approx(6e9 / mixtral.total_expert_bytes))
    stand_in = dataclasses.replace(mixtral, name="small", hidden_size=256, expert_intermediate_size=512)
    nbytes, fraction = budget_bytes("6GB", stand_in)
    assert fraction == pytest.approx(6e9 / mixtral.total_expert_bytes)
    assert nbytes == int(fraction * stand_in.total_expert_bytes)


def test_quick_reproduction_puts_real_routing_in_the_main_table_on_the_testbed_and_one_gpu(tmp_path):
    trace = generate_synthetic(tmp_path / "syn", load_model_spec("mixtral-8x7b"),
                               SyntheticParams(requests=6, prompt_tokens=(4, 8), output_tokens=(4, 8)))
    out = tmp_path / "out"
    policies = ["lru", "mixtral_offload", "finemoe", "reuse", "all_resident"]
    main(["--quick", "--traces", f"mixtral-8x7b-gsm8k,{trace}", "--out", str(out), "--jobs", "1",
          "--train-requests", "1", "--policies", ",".join(policies)])
    runs = pd.read_csv(out / "runs.csv", keep_default_na=False)
    real = runs[runs["trace"] == "mixtral-8x7b-gsm8k"]
    plain = real[real["variant"] == ""]
    assert sorted(plain["hardware"]) == sorted(["rtx3090x6"] * 5 + ["rtx3090"] * 5)
    assert set(runs["budget"]) == {"6GB"} and (runs["budget_bytes"] == 6 * 10**9).all()
    testbed = plain[plain["hardware"] == "rtx3090x6"].set_index("policy")
    assert (testbed["budget_total_bytes"] == 36 * 10**9).all()  # 6 GB on each of six GPUs
    assert testbed.loc["finemoe", "placement"] == "round_robin" and testbed.loc["lru", "placement"] == "layers"
    assert runs.loc[runs["policy"] != "all_resident", "link_busy_fraction"].between(0, 1).all()
    placed = real[real["variant"] == "placed round_robin"]  # what FineMoE's placement alone is worth
    assert sorted(placed["policy"]) == sorted(set(policies) - {"finemoe"})  # finemoe is placed so already
    assert set(placed["hardware"]) == {"rtx3090x6"} and set(placed["placement"]) == {"round_robin"}
    assert set(real.loc[~real["variant"].isin(["", "placed round_robin"]), "policy"]) == {"reuse"}  # ours' ablation
    assert 0 <= float(testbed.loc["finemoe", "map_accuracy"]) <= 1 and testbed.loc["lru", "map_accuracy"] == ""
    synthetic = runs[runs["trace"] == "syn"]
    assert set(synthetic["hardware"]) == {"rtx3090"} and (synthetic["variant"] == "").all()
    report = (out / "reproduction.md").read_text()
    main_table = report[:report.index("## Synthetic and stand-in routing")]
    tables = "\n".join(line for line in main_table.splitlines() if not line.startswith("Commit `"))  # the command names it
    assert "syn" not in tables.replace("synthetic", "")
    for setup in ("#### mixtral-8x7b-gsm8k on `rtx3090x6` (6 GPUs; a budget is each GPU's",
                  "#### mixtral-8x7b-gsm8k on `rtx3090` (one GPU)"):
        section = main_table[main_table.index(setup):]
        for claim in ("lower inference latency | ", "higher expert hit rate | ", "lower TPOT | ", "47.0%", "36.0%",
                      "32.0%", "Ours (`reuse`) against the best", "Ablation of ours", "links busy", "map accuracy"):
            assert claim in section
        assert "Where ours differ" in section or "within 10 points" in section
    assert "syn (synthetic)" in report[report.index("## Synthetic and stand-in routing"):]


def test_a_malformed_budget_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--budgets", "6GB,6XB", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_a_reproduction_keeps_each_run_and_a_restart_runs_only_what_is_missing_or_stale(tmp_path, capsys):
    trace = generate_synthetic(tmp_path / "syn", load_model_spec("mixtral-8x7b"),
                               SyntheticParams(requests=6, prompt_tokens=(4, 8), output_tokens=(4, 8)))
    out = tmp_path / "out"
    args = ["--quick", "--traces", str(trace), "--out", str(out), "--jobs", "1", "--train-requests", "3",
            "--policies", "lru,belady,all_resident"]
    main(args)
    first = pd.read_csv(out / "runs.csv")
    rows = {p.parent.name: p for p in (out / "runs").rglob("row.json")}
    assert sorted(rows) == ["all_resident-6GB", "belady-6GB", "lru-6GB"]
    stamps = {name: p.stat().st_mtime_ns for name, p in rows.items()}
    rows["belady-6GB"].unlink()  # killed before belady finished
    made_by = rows["lru-6GB"].parent / "provenance.json"
    made_by.write_text(made_by.read_text().replace('"code_version": "', '"code_version": "older-'))  # stale code
    capsys.readouterr()
    main(args)
    assert "1 of 3 runs already complete" in capsys.readouterr().out
    assert rows["all_resident-6GB"].stat().st_mtime_ns == stamps["all_resident-6GB"]  # kept, not run again
    assert rows["lru-6GB"].stat().st_mtime_ns != stamps["lru-6GB"] and rows["belady-6GB"].is_file()
    pd.testing.assert_frame_equal(pd.read_csv(out / "runs.csv"), first)
    # The trace rewritten in place (its content hash changes): every run is done again.
    meta = trace / "meta.json"
    meta.write_text(meta.read_text() + "\n")
    main(args)
    assert "already complete" not in capsys.readouterr().out


def test_host_cpu_policies_are_planned_only_where_the_profile_has_the_cpu(tmp_path):
    """The testbed's profiles measure no host CPU: fiddler there would stop the whole reproduction."""
    from sim.reproduce import plan_runs
    from traces.defaults import resolve_trace
    from traces.shared import shared_trace

    trace = shared_trace(resolve_trace("mixtral-8x7b-gsm8k"))
    runs = plan_runs([trace], ["lru", "fiddler"], ["6GB"], ["rtx3090", "h200-measured"], "per_gpu", 1, 1, 0,
                     ablation=False)
    assert {(r.cfg.hardware, r.policy) for r in runs} == {("rtx3090", "lru"), ("h200-measured", "lru"),
                                                         ("h200-measured", "fiddler")}
