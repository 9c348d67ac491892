"""Prompt-conditioned routing (traces.conditioned): its fit at a fixed seed."""
from traces.conditioned_check import leave_one_out
from traces.defaults import DATA_DIR
from traces.format import load_trace
from traces.stats import realism_distance

E, K, L = 8, 2, 4
GOLDEN_REUSE = 0.33451704545454547  # Mixtral leave-one-out, seed 0
GOLDEN_TRAJECTORY_1 = 0.4404466501240695


def test_mixtral_leave_one_out_fit_is_pinned_and_within_ten_percent():
    real, ours = leave_one_out(load_trace(DATA_DIR / "mixtral-8x7b-gsm8k"), seed=0)
    assert realism_distance(ours, real) < 0.10
    assert abs(ours["token_reuse"] - GOLDEN_REUSE) < 1e-12
    assert abs(ours["trajectory_accuracy"]["1"] - GOLDEN_TRAJECTORY_1) < 1e-12
