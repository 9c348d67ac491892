"""realrun.compare's figures against issue 21's targets, and the commit a table records."""
import pandas as pd

from realrun.compare import code_commit, summary


def test_summary_counts_targets_median_tpot_error_and_ttft_within_ten_percent():
    table = pd.DataFrame({"targets_met": [True, True, False, True],
                          "tpot_mean_rel_err": [0.01, -0.03, 0.08, -0.02],
                          "ttft_mean_rel_err": [0.05, -0.12, 0.10, 0.30]})
    assert summary(table) == {"runs": 4, "met": 3, "median_tpot_err": 0.025, "ttft_within": 2}


def test_code_commit_is_the_one_given_for_a_tree_copied_out_of_git(monkeypatch):
    monkeypatch.setenv("REALRUN_CODE_COMMIT", "abc123")
    assert code_commit() == "abc123 (REALRUN_CODE_COMMIT)"
    monkeypatch.delenv("REALRUN_CODE_COMMIT")
    assert "REALRUN_CODE_COMMIT" not in code_commit()
