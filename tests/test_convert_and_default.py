import json

import numpy as np
import pytest

from conftest import SHARED_ROUTING
from sim.api import simulate
from sim.config import SimConfig
from traces import UserError, load_trace
from traces.convert import import_topk_jsonl, main
from traces.defaults import DATA_DIR, resolve_trace
from traces.model_spec import load_model_spec

needs_shared = pytest.mark.skipif(not SHARED_ROUTING.is_dir(), reason="../shared/data not present")


@needs_shared
def test_shipped_real_trace_is_the_conversion_of_the_shared_log(tmp_path):
    fresh = load_trace(import_topk_jsonl(SHARED_ROUTING / "gsm8k_2_routing.jsonl", tmp_path / "t",
                                         load_model_spec("mixtral-8x7b"), prompts=SHARED_ROUTING / "gsm8k_2_outputs.jsonl"))
    shipped = load_trace(DATA_DIR / "mixtral-8x7b-gsm8k")
    np.testing.assert_array_equal(fresh.experts, shipped.experts)
    np.testing.assert_array_equal(fresh.dense_probs(), shipped.dense_probs())
    assert list(shipped.requests["decode_iters"]) == [166, 78]  # the complete tokens of the log
    assert shipped.meta.extra["incomplete_tokens_dropped"] == {"gsm8k/0": 2, "gsm8k/1": 1}
    assert shipped.source.model == "mistralai/Mixtral-8x7B-Instruct-v0.1"
    assert "FP8" in shipped.source.weights_origin
    assert shipped.requests["prompt"].iloc[0].startswith("Janet")


def test_shipped_trace_replays_with_per_layer_lru_in_the_expected_range():
    # 4 of 8 experts per layer resident: the shared data's README gives 57-61% per sequence.
    trace = load_trace(DATA_DIR / "mixtral-8x7b-gsm8k")
    m = simulate(SimConfig(trace=str(trace.path), policy="lru", budget="128experts"), trace=trace).metrics
    assert 0.55 <= m.hit_rate <= 0.65
    assert m.hit_rate == pytest.approx(0.6012, abs=1e-4)
    per_layer_belady = simulate(SimConfig(trace=str(trace.path), policy="belady", budget="128experts",
                                          policy_params={"scope": "per_layer"}), trace=trace).metrics
    assert per_layer_belady.hit_rate == pytest.approx(0.7329, abs=1e-4)  # README: 71-73% per sequence


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_importer_orders_tokens_and_drops_an_unfinished_last_token(tmp_path):
    model = load_model_spec("mixtral-8x7b")
    rows = [{"problem_id": 0, "token_idx": t, "layer": l, "experts": [l % 8, (l + t + 1) % 8],
             "gating_probs": [0.7, 0.3]} for t in (1, 0) for l in range(32)]
    rows += [{"problem_id": 0, "token_idx": 2, "layer": 0, "experts": [1, 2], "gating_probs": [0.5, 0.5]}]
    trace = load_trace(import_topk_jsonl(write_jsonl(tmp_path / "log.jsonl", rows), tmp_path / "t", model))
    assert trace.rows(0) == (0, 0, 2)
    assert trace.experts[1, 5].tolist() == [5, 7]
    assert trace.probs(1, 5)[[5, 7]].tolist() == pytest.approx([0.7, 0.3], abs=1e-3)
    assert trace.meta.extra["incomplete_tokens_dropped"] == {"unknown/0": 1}


@pytest.mark.parametrize("line, message", [
    ('{"problem_id": 0', "not valid JSON"),
    ('{"problem_id": 0, "token_idx": 0, "layer": 0}', "lacks"),
    ('{"problem_id": 0, "token_idx": 0, "layer": 40, "experts": [1, 2], "gating_probs": [0.5, 0.5]}', "outside model"),
    ('{"problem_id": 0, "token_idx": 0, "layer": 0, "experts": [1], "gating_probs": [1.0]}', "top-2"),
])
def test_importer_errors_are_one_line(tmp_path, capsys, line, message):
    (tmp_path / "bad.jsonl").write_text(line + "\n")
    with pytest.raises(SystemExit) as info:
        main(["topk-jsonl", str(tmp_path / "bad.jsonl"), str(tmp_path / "out"), "--model", "mixtral-8x7b"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_default_resolves_to_a_shipped_trace():
    assert (resolve_trace("default") / "meta.json").is_file()
