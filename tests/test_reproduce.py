"""python -m sim.reproduce: every policy over a trace, the paper's budgets, the comparison table."""
import dataclasses

import pandas as pd
import pytest

from policies import available
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


def test_quick_reproduction_runs_every_policy_and_ends_with_the_papers_claims(tmp_path):
    trace = generate_synthetic(tmp_path / "syn", load_model_spec("mixtral-8x7b"),
                               SyntheticParams(requests=6, prompt_tokens=(4, 8), output_tokens=(4, 8)))
    out = tmp_path / "out"
    main(["--quick", "--traces", str(trace), "--out", str(out), "--jobs", "1", "--train-requests", "3"])
    runs = pd.read_csv(out / "runs.csv")
    policies = sorted(p for p in available() if not p.startswith("test_"))
    assert sorted(runs["policy"]) == policies and set(runs["budget"]) == {"6GB"}
    assert (runs["requests"] == 2).all() and (runs["budget_bytes"] == 6 * 10**9).all()
    assert runs.loc[runs["policy"] == "promoe", "predictor_precision"].between(0, 1).all()
    report = (out / "reproduction.md").read_text()
    last = report[report.index("### FineMoE against the best baseline at 6GB"):]
    for claim in ("lower inference latency | ", "higher expert hit rate | ", "lower TPOT | ", "47.0%", "36.0%", "32.0%"):
        assert claim in last
    assert "Where ours differ" in last or "within 10 points" in last
    for plot in ("syn_hit_rate.png", "syn_tpot.png"):
        assert (out / plot).stat().st_size > 0


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
