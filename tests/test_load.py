import pandas as pd

from sim.load import main
from traces.model_spec import load_model_spec
from traces.synthetic import SyntheticParams, generate_synthetic


def test_load_curve_writes_a_table_and_plots_with_units(tmp_path):
    trace = generate_synthetic(tmp_path / "t", load_model_spec("mixtral-8x7b"),
                               SyntheticParams(requests=6, prompt_tokens=(4, 8), output_tokens=(4, 8)))
    main(["--trace", str(trace), "--max-batch", "2", "--fractions", "0.5,1.5", "--out", str(tmp_path / "out")])
    curve = pd.read_csv(tmp_path / "out" / "load_curve.csv")
    assert len(curve) == 2 and curve["offered_rate_rps"].is_monotonic_increasing
    assert all(c.endswith(("_s", "_rps", "_per_s")) or c == "hit_rate" for c in curve.columns)
    assert curve["ttft_p99_s"].iloc[1] >= curve["ttft_p99_s"].iloc[0]  # queueing past capacity
    for name in ("load_curve.md", "load_curve.png", "load_curve.svg"):
        assert (tmp_path / "out" / name).stat().st_size > 0
