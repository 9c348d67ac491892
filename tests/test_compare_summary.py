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


def test_a_changed_work_tree_is_named_by_the_tree_a_commit_of_it_would_have(tmp_path, monkeypatch):
    import subprocess
    monkeypatch.delenv("REALRUN_CODE_COMMIT", raising=False)

    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    git("init", "-q")
    git("config", "user.email", "t@t"), git("config", "user.name", "t")
    (tmp_path / ".gitignore").write_text("*.log\n")
    (tmp_path / "a.py").write_text("1\n")
    git("add", "-A"), git("commit", "-q", "-m", "base")
    base = git("rev-parse", "HEAD")
    assert code_commit(tmp_path) == base
    (tmp_path / "a.py").write_text("2\n")
    (tmp_path / "new.py").write_text("3\n")  # untracked, not ignored: part of the code that ran
    (tmp_path / "run.log").write_text("ignored\n")
    reported = code_commit(tmp_path)
    assert git("diff", "--cached", "--name-only") == ""  # the checkout's own index was left alone
    git("add", "-A"), git("commit", "-q", "-m", "the change")
    assert reported == f"{base} +changes (work tree {git('rev-parse', 'HEAD^{tree}')})"
