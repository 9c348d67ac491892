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
