"""Golden figures of every policy that existed before the CPU and disk tiers, on a fixed synthetic
trace (labelled so: traces.synthetic, seed 2), to pin that those tiers off change nothing.
Regenerate only on purpose: python -m tests.golden_tiers (writes tests/data/golden_tiers.json)."""
from __future__ import annotations

import json
from pathlib import Path

from policies import policy_class
from sim.api import simulate
from sim.config import SimConfig
from traces import load_trace
from traces.model_spec import load_model_spec
from traces.synthetic import SyntheticParams, generate_synthetic

GOLDEN = Path(__file__).parent / "data" / "golden_tiers.json"
POLICIES = ["all_resident", "belady", "deepspeed", "finemoe", "lru", "mixtral_offload", "moe_infinity", "moepic",
            "oracle_prefetch", "promoe"]
CASES = [("5experts", 1), ("40experts", 3)]  # (budget, max_batch, with 3 closed-loop clients)
KEYS = ["hit_rate", "late_prefetch_rate", "tpot_mean_s", "ttft_mean_s", "makespan_s", "bytes_h2d", "evictions",
        "gpu_mem_high_water_bytes"]


def make_trace(root: Path):
    params = SyntheticParams(requests=6, prompt_tokens=(4, 12), output_tokens=(4, 12), seed=2)
    return load_trace(generate_synthetic(root / "syn", load_model_spec("mixtral-8x7b"), params))


def figures(trace, hardware: str = "h200-measured", **extra) -> dict[str, dict[str, float]]:
    out = {}
    for name in POLICIES:
        for budget, batch in CASES:
            if batch > 1 and policy_class(name).reads_future:
                continue  # oracles replay one request at a time
            cfg = SimConfig(trace=str(trace.path), policy=name, budget=budget, train_fraction=0.34, seed=1,
                            hardware=hardware, max_batch=batch, clients=batch, **extra)
            m = simulate(cfg, trace=trace).metrics.to_dict()
            out[f"{name}/{budget}/b{batch}"] = {k: m[k] for k in KEYS}
    return out


if __name__ == "__main__":
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        GOLDEN.write_text(json.dumps(figures(make_trace(Path(tmp))), indent=1, sort_keys=True) + "\n")
