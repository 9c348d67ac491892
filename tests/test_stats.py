"""traces.stats: golden figures on hand-built traces, exact agreement with the simulator's per-layer
LRU and Belady, the real sample's figures, realism metadata and the command line."""
import json

import numpy as np
import pytest

from conftest import tiny_model
from sim.api import simulate
from sim.config import SimConfig
from traces import Provenance, TraceWriter, load_trace
from traces.defaults import DATA_DIR
from traces.stats import (annotate, cache_hit_rates, expert_popularity, iteration_entropy, main, next_layer_recall,
                          popularity_divergence, realism_figures, request_entropy, routing_segments, token_reuse,
                          trace_reuse)
from traces.synthetic import SyntheticParams, generate_synthetic

REAL = DATA_DIR / "mixtral-8x7b-gsm8k"


def entropy(counts):
    p = np.asarray(counts, dtype=float)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log2(p)).sum())


@pytest.fixture
def cyclic(make_trace):
    # One layer, 4 experts, top-1. Request 0 cycles 0 1 2 (LRU with 2 slots never hits), request 1 repeats 3.
    return make_trace(tiny_model(layers=1, experts=4, top_k=1),
                      [[[[e]] for e in (0, 1, 2, 0, 1, 2, 0)], [[[3]], [[3]]]])


def test_golden_figures_of_a_hand_built_trace(cyclic):
    assert token_reuse(cyclic) == pytest.approx(1 / 7)  # only 3 -> 3 repeats, of 6 + 1 transitions
    np.testing.assert_allclose(expert_popularity(cyclic)[0], [3 / 9, 2 / 9, 2 / 9, 2 / 9])
    assert request_entropy(cyclic)[0] == pytest.approx((entropy([3, 2, 2]) + 0.0) / 2)
    rates = cache_hit_rates(cyclic, [1, 2, 3]).set_index("slots")
    # 2 slots: LRU hits only the second 3; Belady also keeps 0 then 2 for their next uses (0 1 2 [0] 1 [2] 0).
    assert rates.loc[2, "lru_hit_rate"] == pytest.approx(1 / 9)
    assert rates.loc[2, "belady_hit_rate"] == pytest.approx(3 / 9)
    assert rates.loc[1, "lru_hit_rate"] == rates.loc[1, "belady_hit_rate"] == pytest.approx(1 / 9)
    assert rates.loc[3, "lru_hit_rate"] == pytest.approx(5 / 9)  # 0 1 2 warm the cache, then every use hits but 3


def test_iteration_entropy_is_of_the_router_probabilities(tmp_path):
    model = tiny_model(layers=1, experts=4, top_k=1)
    writer = TraceWriter(tmp_path / "t", model, Provenance("test", "none", "hand-built", "tests"))
    writer.add_request(request_id="r", dataset="test", probs=np.array([[[0.5, 0.5, 0, 0]], [[0.25] * 4]]))
    trace = load_trace(writer.close())
    assert iteration_entropy(trace)[0] == pytest.approx(1.5)  # 1 bit and 2 bits


def test_next_layer_recall_is_perfect_when_layer_one_copies_layer_zero(make_trace):
    rng = np.random.default_rng(0)
    requests = [[[[e], [e]] for e in rng.choice([0, 0, 1, 2, 3], size=40)] for _ in range(2)]
    trace = make_trace(tiny_model(layers=2, experts=4, top_k=1), requests)
    recall, by_popularity = next_layer_recall(trace)
    assert recall[0] == 1.0
    assert by_popularity[0] < 0.6


def test_popularity_divergence_between_requests():
    same = [np.array([[[0]], [[1]]]), np.array([[[1]], [[0]]])]
    apart = [np.array([[[0]], [[0]]]), np.array([[[1]], [[1]]])]
    assert popularity_divergence(same, 2)[0] == 0.0
    assert popularity_divergence(apart, 2)[0] == 1.0


def _simulated(trace, policy, slots):
    cfg = SimConfig(trace=str(trace.path), policy=policy, budget=f"{trace.model.num_layers * slots}experts",
                    policy_params={"scope": "per_layer"})
    return simulate(cfg, trace=trace).per_layer["hit_rate"].to_numpy()


@pytest.mark.parametrize("slots", [2, 4, 6])
def test_per_layer_lru_and_belady_equal_the_simulators_on_the_real_trace(slots):
    trace = load_trace(REAL)
    rates = cache_hit_rates(trace, [slots])
    for policy in ("lru", "belady"):
        np.testing.assert_array_equal(rates[f"{policy}_hit_rate"].to_numpy(), _simulated(trace, policy, slots))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_layer_lru_and_belady_equal_the_simulators_on_random_decode_traces(tmp_path, seed):
    model = tiny_model(layers=3, experts=6, top_k=2)
    params = SyntheticParams(requests=4, prompt_tokens=(0, 0), output_tokens=(3, 40), stickiness=float(seed),
                             seed=seed)
    trace = load_trace(generate_synthetic(tmp_path / "t", model, params))
    rates = cache_hit_rates(trace)
    assert sorted(rates["slots"].unique()) == [2, 3, 4, 5, 6]
    for slots, rows in rates.groupby("slots"):
        for policy in ("lru", "belady"):
            np.testing.assert_array_equal(rows[f"{policy}_hit_rate"].to_numpy(), _simulated(trace, policy, slots))


def test_the_real_samples_figures_agree_with_routing_realism_md():
    # routing-realism.md, over 4 sequences of which the shipped sample holds 2: LRU 37.3/61.4/81.8,
    # Belady 37.3/74.5/90.7, reuse 37.5%, request entropy 2.90 bits; per sequence, LRU at 4 slots
    # 57-61% and Belady 71-73% (../shared/data/README.md).
    trace = load_trace(REAL)
    figures = realism_figures(trace)
    assert figures["lru_hit_rate"] == pytest.approx({"2": 0.3425, "4": 0.6012, "6": 0.8106}, abs=1e-4)
    assert figures["belady_hit_rate"] == pytest.approx({"2": 0.3425, "4": 0.7329, "6": 0.8993}, abs=1e-4)
    assert figures["token_reuse"] == pytest.approx(0.3443, abs=1e-4)
    assert figures["request_entropy_bits"] == pytest.approx(2.90, abs=0.02)
    assert [len(seg) for seg in routing_segments(trace)] == [166, 78]
    assert figures["distance_to_real"] == 0.0 and figures["reference"] == ["mixtral-8x7b-gsm8k"]
    assert trace.meta.realism == figures  # the shipped meta is up to date


def test_every_written_trace_carries_its_realism_figures(tmp_path):
    model = tiny_model(layers=2, experts=4, top_k=1)
    trace = load_trace(generate_synthetic(tmp_path / "t", model, SyntheticParams(requests=3)))
    realism = trace.meta.realism
    assert realism["token_reuse"] == pytest.approx(token_reuse(trace))
    assert trace_reuse(trace) == realism["token_reuse"]
    assert set(realism["lru_hit_rate"]) == {"1", "2", "3"}  # a quarter, half and three quarters of 4 experts
    assert realism["distance_to_real"] is None and realism["reference"] is None  # no real trace of this shape


def test_annotate_rewrites_the_meta_in_place(tmp_path):
    model = tiny_model(layers=1, experts=4, top_k=1)
    writer = TraceWriter(tmp_path / "t", model, Provenance("test", "none", "hand-built", "tests"))
    writer.add_request(request_id="r", dataset="test", probs=np.eye(4)[[0, 0, 1, 1]][:, None])
    path = writer.close(realism={})
    assert load_trace(path).meta.realism == {}
    figures = annotate(path)
    assert load_trace(path).meta.realism == json.loads(json.dumps(figures))
    assert figures["token_reuse"] == pytest.approx(2 / 3)
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["meta.json", "requests.parquet", "experts.npy", "probs.npy", "prefill_counts.npy"])


def test_command_line_prints_traces_side_by_side_and_writes_figures(tmp_path, capsys):
    other = generate_synthetic(tmp_path / "synthetic", tiny_model(layers=32, experts=8, top_k=2, name="m"),
                               SyntheticParams(requests=2, prompt_tokens=(0, 0), output_tokens=(10, 20)))
    main([str(REAL), str(other), "--slots", "2", "4", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "mixtral-8x7b-gsm8k" in out and "synthetic" in out
    assert "LRU hit rate, 4 slots" in out and "60.1%" in out and "next-layer recall" in out
    # what predictors exploit, side by side: the real sample's trajectory search at distance 6 (46.0%),
    # and the real tokens behind the distance of both (a "m"-model trace has no real reference)
    lines = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]] for line in out.splitlines()
             if line.count("│") == 4}
    assert lines["trajectory search accuracy, distance 6"][0] == "46.0%"
    assert lines["... measured against (real tokens)"] == ["mixtral-8x7b-gsm8k (244)", "-"]
    assert lines["routing"] == ["real", "synthetic"]
    for name in ("per_layer.csv", "hit_rates.csv", "stats.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0


def test_command_line_rejects_impossible_slots_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main([str(REAL), "--slots", "1", "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "slots [1] outside 2..8" in err and "\n" not in err
