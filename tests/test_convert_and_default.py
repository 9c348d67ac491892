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


# --- routing-npz (the gpt-oss-20b collection's layout) ---
from conftest import SHARED_GPT_OSS  # noqa: E402
from traces.convert import import_routing_npz  # noqa: E402

GPT_OSS = load_model_spec("gpt-oss-20b")


def write_npz_slice(src, lengths, categories):
    """A hand-made collection in the shared layout: requests.jsonl + routing.npz."""
    src.mkdir()
    rng = np.random.default_rng(3)
    tokens = sum(lengths)
    experts = np.stack([rng.permutation(32)[:4] for _ in range(tokens * 24)]).reshape(tokens, 24, 4).astype(np.uint8)
    probs = np.tile(np.array([0.4, 0.3, 0.2, 0.1], dtype=np.float16), (tokens, 24, 1))
    np.savez(src / "routing.npz", experts=experts, probs=probs, offsets=np.concatenate([[0], np.cumsum(lengths)]))
    write_jsonl(src / "requests.jsonl", [
        {"request": 10 + i, "dataset": "mmlu_test", "category": c, "prompt": f"question {i} about {c}",
         "prompt_tokens": 90 + i, "generated_tokens": n + 1} for i, (n, c) in enumerate(zip(lengths, categories))])
    return experts, probs


def test_routing_npz_import_keeps_ids_weights_subjects_and_marks_unknowns(tmp_path):
    experts, probs = write_npz_slice(tmp_path / "src", [5, 0, 7, 3], ["Astro", "Astro", "Astro", "Law"])
    trace = load_trace(import_routing_npz(tmp_path / "src", tmp_path / "t", GPT_OSS, per_subject=1, max_decode=4,
                                          embeddings=False))
    assert list(trace.requests["request_id"]) == ["10", "13"]  # request 11 has no rows; 12 is Astro's second
    assert list(trace.requests["subject"]) == ["Astro", "Law"] and list(trace.requests["decode_iters"]) == [4, 3]
    assert list(trace.requests["prompt_tokens"]) == [90, 93] and trace.requests["prompt"].iloc[1] == "question 3 about Law"
    np.testing.assert_array_equal(trace.experts[:4], experts[:4])  # source order, most probable first
    np.testing.assert_array_equal(trace.experts[4:], experts[12:15])
    row = trace.probs(2, 7)
    assert row[experts[2, 7]].tolist() == pytest.approx([0.4, 0.3, 0.2, 0.1], abs=1e-3)
    assert np.isnan(row).sum() == 28 and trace.probs_known == "topm"
    assert not trace.prefill_recorded and trace.meta.prefill_recorded is False
    assert trace.model.expert_format == "mxfp4" and trace.source.details["source_commit"].startswith("72b368f6")
    assert trace.meta.extra["selection"]["kept_requests"] == ["10", "13"]


@pytest.mark.parametrize("broken, message", [
    ("offsets", "offsets must rise"), ("requests", "requests.jsonl has 1 requests"), ("layers", "expected (tokens, 24, 4)")])
def test_routing_npz_errors_are_one_line(tmp_path, capsys, broken, message):
    experts, probs = write_npz_slice(tmp_path / "src", [2, 2], ["A", "B"])
    if broken == "offsets":
        np.savez(tmp_path / "src" / "routing.npz", experts=experts, probs=probs, offsets=np.array([0, 3, 2]))
    elif broken == "requests":
        (tmp_path / "src" / "requests.jsonl").write_text((tmp_path / "src" / "requests.jsonl").read_text().splitlines()[0])
    else:
        np.savez(tmp_path / "src" / "routing.npz", experts=experts[:, :3], probs=probs[:, :3], offsets=np.array([0, 2, 4]))
    with pytest.raises(SystemExit) as info:
        main(["routing-npz", str(tmp_path / "src"), str(tmp_path / "out"), "--model", "gpt-oss-20b", "--no-embeddings"])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not SHARED_GPT_OSS.is_dir(), reason="../shared/data not present")
def test_the_shipped_gpt_oss_trace_is_the_conversion_of_the_shared_collection(tmp_path):
    shipped = load_trace(resolve_trace("gpt-oss-20b-benchmarks"))
    selection = shipped.meta.extra["selection"]
    assert (selection["per_subject"], selection["max_decode"], selection["source_requests"]) == (2, 64, 603)
    with np.load(SHARED_GPT_OSS / "routing.npz") as z:
        experts, offsets = z["experts"], z["offsets"]
    first = int(shipped.requests["request_id"].iloc[5])  # request ids are the source's request indices
    offset, _, decode = shipped.rows(5)
    np.testing.assert_array_equal(shipped.experts[offset: offset + decode], experts[offsets[first]: offsets[first] + decode])
    assert shipped.num_requests == 243 and shipped.num_iterations == 15386
    assert shipped.embedding("minilm").shape == (243, 384) and shipped.requests["subject"].notna().all()


def test_expert_formats_give_the_stored_bytes():
    assert GPT_OSS.expert_bytes_by_format() == {"bf16": 49_783_680, "fp8": 24_900_480, "int4": 12_847_680,
                                                "mxfp4": 13_236_480}  # hardware.md: 49.8 MB bf16, ~13.2 MB MXFP4
    assert GPT_OSS.bytes_per_expert == 13_236_480 and GPT_OSS.with_format("bf16").bytes_per_expert == 49_783_680
    assert load_model_spec("mixtral-8x7b").bytes_per_expert == 352_321_536  # bf16 by default
    with pytest.raises(UserError, match="unknown expert format 'fp4'; known formats: bf16, fp8, int4, mxfp4"):
        GPT_OSS.with_format("fp4")


def test_budgets_count_bytes_of_the_stored_format():
    trace = load_trace(resolve_trace("default"))
    runs = {fmt: simulate(SimConfig(budget="2GB", max_requests=1, model={"expert_format": fmt}), trace=trace).metrics
            for fmt in (None, "bf16")}
    assert runs[None].budget_experts == pytest.approx(2e9 / 13_236_480)  # 151 mxfp4 experts
    assert runs["bf16"].budget_experts == pytest.approx(2e9 / 49_783_680)  # 40 bf16 experts
    assert runs[None].policy_info["dequant_uncharged"] == "mxfp4" and "dequant_uncharged" not in runs["bf16"].policy_info
    assert runs["bf16"].bytes_h2d > runs[None].bytes_h2d
    assert runs[None].ttft_prefill == "left out"  # decode-only: the prompts' routing was not recorded


def test_ttft_says_whether_prefill_is_simulated(make_trace):
    from conftest import tiny_model

    model = tiny_model(layers=1, experts=4, top_k=1)
    with_prefill = make_trace(model, [[[[0]], [[1]], [[2]]]], prefill=[2])
    decode_only = make_trace(model, [[[[0]], [[1]], [[2]]]])
    for trace, label in ((with_prefill, "recorded"), (decode_only, "left out")):
        assert simulate(SimConfig(trace=str(trace.path), budget="1experts"), trace=trace).metrics.ttft_prefill == label
