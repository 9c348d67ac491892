import json

import numpy as np
import pandas as pd
import pytest

from conftest import tiny_model
from traces import FORMAT_VERSION, Provenance, TraceError, TraceWriter, UserError, load_trace
from traces.format import EXPERTS, META, PROBS, REQUESTS, tally_experts, top_k_experts
from traces.model_spec import ModelSpec, load_model_spec

SOURCE = Provenance("test-model", "random init", "hand-built", "tests", details={"seed": 1})


def write_two_requests(path, topm=None):
    model = tiny_model(layers=2, experts=6, top_k=2)
    rng = np.random.default_rng(0)
    writer = TraceWriter(path, model, SOURCE, topm=topm)
    for r, (n, pf) in enumerate([(5, 2), (3, 0)]):
        writer.add_request(request_id=f"q{r}", dataset="d", probs=rng.dirichlet(np.ones(6), size=(n, 2)),
                           prefill_iters=pf, prompt="hello" if r == 0 else None,
                           embeddings={"sent": np.arange(3.0) + r} if r == 0 else None,
                           lookahead=rng.random((n, 2, 1, 6)), hidden_proj=rng.random((n, 2, 4)))
    writer.close(realism={"token_reuse": 0.5})
    return model


def test_round_trip_keeps_everything(tmp_path):
    model = write_two_requests(tmp_path / "t")
    trace = load_trace(tmp_path / "t")
    assert trace.meta.format_version == FORMAT_VERSION
    assert trace.model == model and trace.source == SOURCE
    assert (trace.num_requests, trace.num_iterations) == (2, 8)
    assert trace.rows(0) == (0, 2, 3) and trace.rows(1) == (5, 0, 3)
    assert trace.requests["prompt"].iloc[0] == "hello" and pd.isna(trace.requests["prompt"].iloc[1])
    assert list(trace.requests["output_tokens"]) == [4, 3]  # prefill emits one token; decode-only: one per row
    # experts default to the top-k of the probabilities, prefill counts to their tally
    np.testing.assert_array_equal(trace.experts, top_k_experts(trace.probs(slice(None)), 2))
    np.testing.assert_array_equal(trace.prefill_counts[0], tally_experts(trace.experts[:2], 6))
    assert trace.prefill_counts[1].sum() == 0
    emb = trace.embedding()
    np.testing.assert_array_equal(emb[0], [0, 1, 2])
    assert np.isnan(emb[1]).all()  # unknown for the second request
    assert trace.lookahead.shape == (8, 2, 1, 6) and trace.hidden_proj.shape == (8, 2, 4)
    assert trace.meta.realism == {"token_reuse": 0.5}


def test_sparse_top_m_layout_keeps_the_top_m(tmp_path):
    write_two_requests(tmp_path / "dense")
    write_two_requests(tmp_path / "sparse", topm=3)
    dense, sparse = load_trace(tmp_path / "dense"), load_trace(tmp_path / "sparse")
    assert sparse.meta.probs_layout == "topm" and not (tmp_path / "sparse" / PROBS).exists()
    d, s = dense.probs(slice(None)), sparse.probs(slice(None))
    assert ((s > 0).sum(axis=-1) == 3).all()
    kept = s > 0
    np.testing.assert_array_equal(d[kept], s[kept])
    np.testing.assert_array_equal(dense.experts, sparse.experts)


def test_a_failing_writer_leaves_nothing_behind(tmp_path):
    model = tiny_model()
    with pytest.raises(RuntimeError):
        with TraceWriter(tmp_path / "t", model, SOURCE) as writer:
            writer.add_request(request_id="a", dataset="d", probs=np.ones((2, 1, 4)))
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_existing_trace_is_replaced_only_on_request(tmp_path):
    write_two_requests(tmp_path / "t")
    with pytest.raises(UserError, match="already exists"):
        write_two_requests(tmp_path / "t")
    assert load_trace(tmp_path / "t").num_requests == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]  # no temporary left over


@pytest.mark.parametrize("bad, message", [
    (dict(probs=np.ones((2, 1, 5))), "probs shape"),
    (dict(probs=np.ones((2, 1, 4)), prefill_iters=3), "prefill_iters 3 outside"),
    (dict(probs=np.ones((2, 1, 4)), experts=np.zeros((2, 1, 2))), "experts shape"),
])
def test_writer_rejects_wrong_shapes(tmp_path, bad, message):
    writer = TraceWriter(tmp_path / "t", tiny_model(), SOURCE)
    with pytest.raises(UserError, match=message):
        writer.add_request(request_id="a", dataset="d", **bad)
    assert writer.num_requests == 0


def corrupt(path, name, data: bytes | None = None, keep: int | None = None):
    target = path / name
    content = target.read_bytes()
    target.write_bytes(content[:keep] if keep is not None else data)


@pytest.mark.parametrize("damage, message", [
    (lambda p: corrupt(p, PROBS, keep=200), "probs.npy: truncated or corrupt"),
    (lambda p: corrupt(p, EXPERTS, keep=100), "experts.npy: truncated or corrupt"),
    (lambda p: (p / PROBS).unlink(), "probs.npy: missing"),
    (lambda p: corrupt(p, REQUESTS, data=b"not parquet"), "requests.parquet: unreadable"),
    (lambda p: corrupt(p, META, data=b"{"), "meta.json: not valid JSON"),
    (lambda p: (p / META).write_text(json.dumps({**json.loads((p / META).read_text()), "format_version": 99})),
     "format version 99"),
    (lambda p: (p / META).write_text(json.dumps({**json.loads((p / META).read_text()), "num_iterations": 9})),
     "do not tile"),
    (lambda p: np.save(p / EXPERTS, np.full((8, 2, 2), 7, dtype=np.uint16)), "expert id 7 out of range"),
    (lambda p: np.save(p / PROBS, np.zeros((8, 2, 6), dtype=np.float32)), "dtype float32"),
])
def test_reader_names_the_file_and_the_problem(tmp_path, damage, message):
    write_two_requests(tmp_path / "t")
    damage(tmp_path / "t")
    with pytest.raises(TraceError, match=message) as info:
        load_trace(tmp_path / "t")
    assert "\n" not in str(info.value)


def test_missing_directory_says_how_to_make_one(tmp_path):
    with pytest.raises(TraceError, match="no such directory.*traces.convert"):
        load_trace(tmp_path / "nope")


def test_model_profiles_have_the_documented_expert_sizes():
    sizes = {name: load_model_spec(name).bytes_per_expert for name in ("mixtral-8x7b", "qwen1.5-moe", "phi-3.5-moe")}
    assert sizes == {"mixtral-8x7b": 352_321_536, "qwen1.5-moe": 17_301_504, "phi-3.5-moe": 157_286_400}


def test_model_spec_from_transformers_configs(tmp_path):
    mixtral = {"num_hidden_layers": 32, "num_local_experts": 8, "num_experts_per_tok": 2, "hidden_size": 4096,
               "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8}
    (tmp_path / "config.json").write_text(json.dumps(mixtral))
    assert ModelSpec.from_hf_config(tmp_path, name="m").same_routing_shape(load_model_spec("mixtral-8x7b"))
    qwen = {"num_hidden_layers": 24, "num_experts": 60, "num_experts_per_tok": 4, "hidden_size": 2048,
            "intermediate_size": 5632, "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
            "num_attention_heads": 16}
    spec = ModelSpec.from_hf_dict(qwen, "qwen")
    assert spec.bytes_per_expert == load_model_spec("qwen1.5-moe").bytes_per_expert and spec.num_shared_experts == 1
    with pytest.raises(UserError, match="not an MoE config"):
        ModelSpec.from_hf_dict({"num_hidden_layers": 2, "hidden_size": 8}, "dense")


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(UserError, match="known models: gpt-oss-20b, mixtral-8x7b"):
        load_model_spec("nope")


def _dense_trace(tmp_path):
    from conftest import write_trace

    return write_trace(tmp_path / "trace", tiny_model(layers=4, experts=4), [[[[0], [1], [2], [3]]] * 12] * 2)


def test_overwritten_string_bytes_in_the_requests_table_are_named_on_load(tmp_path):
    trace = _dense_trace(tmp_path)
    data = bytearray((trace / "requests.parquet").read_bytes())
    at = bytes(data).index(b"test")
    data[at:at + 3] = b"\xff\xfe\xfd"  # passes the Parquet reader, fails UTF-8 decoding later
    (trace / "requests.parquet").write_bytes(bytes(data))
    with pytest.raises(TraceError, match=r"requests.parquet: corrupt content .*UTF8.*re-create the trace"):
        load_trace(trace)


@pytest.mark.parametrize("value", [np.nan, np.inf, -0.5, 7.0])
def test_probabilities_that_are_not_probabilities_are_named_on_load(tmp_path, value):
    trace = _dense_trace(tmp_path)
    load_trace(trace)
    probs = np.load(trace / "probs.npy")
    probs[10, 3, 2] = value
    np.save(trace / "probs.npy", probs)
    with pytest.raises(TraceError, match=r"probs.npy: probability .* at \[iteration, layer, expert\] \[10, 3, 2\]"):
        load_trace(trace)
