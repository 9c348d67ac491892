"""Stand-in models: corpus, balance loss, training (tiny, on the CPU), the attempts table, collection."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("transformers")

from traces.collect.config import CollectConfig  # noqa: E402
from traces.collect.prompts import Conversations  # noqa: E402
from traces.errors import UserError  # noqa: E402
from traces.format import load_trace  # noqa: E402
from traces.standin.attempts import attempts_table, best_run, find_runs  # noqa: E402
from traces.standin.corpus import CorpusConfig, build_corpus  # noqa: E402
from traces.standin.shapes import SHAPES, standin_config  # noqa: E402

WORDS = "the cache holds experts that a router picks for every token of each request".split()
HELD_OUT_WORD = "zyxwvut"  # appears only in held-out conversations


def conversations(count: int = 60) -> Conversations:
    rng = np.random.default_rng(0)
    records = []
    for i in range(count):
        extra = [HELD_OUT_WORD] if i % 5 == 0 else []
        text = " ".join(rng.choice(WORDS, size=30).tolist() + extra)
        records.append({"id": f"c{i}", "output_tokens": None, "messages": [
            {"role": "user", "content": f"question {i}: {text}"}, {"role": "assistant", "content": text[::-1]}]})
    return Conversations(records, "test conversations")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    cfg = CorpusConfig(out=str(tmp_path_factory.mktemp("corpus") / "c"), vocab_size=320, heldout_every=5,
                       eval_sequences=3, eval_tokens=24)
    return build_corpus(cfg, conversations())


def training():
    """traces.standin.train, which runs on torch (the corpus and the shapes do not): a test that
    trains is skipped where torch is not installed."""
    pytest.importorskip("torch")
    from traces.standin import train

    return train


@pytest.fixture(scope="module")
def tiny_run(corpus, tmp_path_factory):
    standin = training()
    cfg = standin.TrainConfig(shape="mixtral-8x7b", corpus=str(corpus), out=str(tmp_path_factory.mktemp("runs") / "tiny"),
                      hidden=16, heads=2, steps=4, batch_tokens=64, context=16, eval_every=2, progress=False,
                      aux_scope="sequence", dropout=0.1, router_input="detached")
    return cfg, standin.train(cfg)


def test_corpus_holds_out_every_nth_conversation_and_renders_chats(corpus):
    from transformers import AutoTokenizer

    info = json.loads((corpus / "corpus.json").read_text())
    assert (info["train_conversations"], info["heldout_conversations"]) == (48, 12)
    tokenizer = AutoTokenizer.from_pretrained(corpus / "tokenizer")
    train_text = tokenizer.decode(np.load(corpus / "train_tokens.npy").astype(int).tolist())
    assert HELD_OUT_WORD not in train_text and "<|assistant|>" in train_text
    assert np.load(corpus / "eval_tokens.npy").shape == (3, 24)
    prompts = json.loads((corpus / "sharegpt_v3_heldout.json").read_text())
    assert len(prompts) == 12 and all(HELD_OUT_WORD in p["messages"][0]["content"] for p in prompts)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert tokenizer.convert_ids_to_tokens(ids)[:2] == ["<s>", "<|user|>"]  # role markers are single tokens


def test_shapes_keep_the_real_routing_topology():
    config = standin_config(SHAPES["qwen1.5-moe"], hidden=256, heads=4, vocab_size=500, special=(0, 1, 2))
    assert (config.num_hidden_layers, config.num_experts, config.num_experts_per_tok) == (24, 60, 4)
    assert (config.moe_intermediate_size, config.shared_expert_intermediate_size) == (176, 704)
    mixtral = standin_config(SHAPES["mixtral-8x7b"], hidden=256, heads=4, vocab_size=500, special=(0, 1, 2))
    assert (mixtral.num_hidden_layers, mixtral.num_local_experts, mixtral.intermediate_size) == (32, 8, 896)


def test_sequence_balance_loss_penalises_sequences_that_keep_their_experts():
    # Two sequences of 8 tokens, 4 experts, top-2: each sequence always takes its own two experts,
    # so the batch as a whole is balanced while every sequence is not.
    balance_loss = training().balance_loss
    import torch

    logits = torch.full((2, 8, 4), -20.0)
    logits[0, :, :2] = 20.0
    logits[1, :, 2:] = 20.0
    layers = (logits.view(16, 4),)
    assert balance_loss(layers, 2, 2, "batch").item() == pytest.approx(2.0, abs=1e-3)  # k at balance
    assert balance_loss(layers, 2, 2, "sequence").item() == pytest.approx(4.0, abs=1e-3)


def test_tiny_training_writes_a_labelled_checkpoint_logs_and_realism(tiny_run):
    cfg, out = tiny_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps_done"] == 4 and summary["stopped_by"] == "steps"
    assert np.isfinite(summary["final_train_loss_nats"]) and summary["heldout_perplexity"] > 1
    assert 0 <= summary["realism"]["token_reuse"] <= 1
    assert list(pd.read_csv(out / "eval_log.csv")["step"]) == [0, 2, 4]
    origin = (out / "standin-mixtral-8x7b-h16" / "weights_origin.txt").read_text()
    assert origin.startswith("trained stand-in") and "aux 0.02 per sequence" in origin
    assert (out / "curves.png").stat().st_size > 0


def test_training_is_reproducible_from_its_seed(tiny_run, tmp_path):
    cfg, out = tiny_run
    again = training().train(type(cfg)(**{**cfg.__dict__, "out": str(tmp_path / "again")}))
    for log in ("train_log.csv", "eval_log.csv"):
        first, second = (pd.read_csv(run / log).drop(columns="elapsed_s") for run in (out, again))
        assert first.equals(second)


def test_collecting_from_a_stand_in_labels_the_trace(tiny_run, corpus, tmp_path):
    from traces.collect.collector import collect

    _, out = tiny_run
    trace = load_trace(collect(CollectConfig(
        model=str(out / "standin-mixtral-8x7b-h16"), dataset=str(corpus / "sharegpt_v3_heldout.json"), n_requests=2,
        max_output_tokens=3, batch_size=2, temperature=1.0, embeddings="token_mean", lookahead=0, progress=False,
        out=str(tmp_path / "trace"))))
    assert trace.model.name == "standin-mixtral-8x7b-h16" and trace.num_requests == 2
    assert trace.source.weights_origin.startswith("trained stand-in")


def test_attempts_table_and_best_run(tiny_run, tmp_path):
    _, out = tiny_run
    runs = []
    for name, distance in (("a", 0.3), ("b", 0.1)):
        run = tmp_path / name
        run.mkdir()
        summary = json.loads((out / "summary.json").read_text())
        summary["realism"]["distance_to_real"] = distance
        (run / "summary.json").write_text(json.dumps(summary))
        runs.append(run)
    table = attempts_table(find_runs([str(tmp_path)]))
    assert list(table["run"])[:2] == ["a", "b"] and "real Mixtral" in table["run"].iloc[-1]
    assert best_run(runs, "mixtral-8x7b").name == "b"
    with pytest.raises(UserError, match="no run of shape"):
        best_run(runs, "qwen1.5-moe")


def test_bad_settings_name_the_problem(corpus, tmp_path):
    standin = training()
    TrainConfig, train = standin.TrainConfig, standin.train
    with pytest.raises(UserError, match="shape=gpt5 unknown"):
        TrainConfig(shape="gpt5", corpus=str(corpus), out=str(tmp_path / "x"))
    with pytest.raises(UserError, match="traces.standin.corpus"):
        train(TrainConfig(shape="mixtral-8x7b", corpus=str(tmp_path / "none"), out=str(tmp_path / "x")))
