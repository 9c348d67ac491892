"""traces.compact, and the compact stand-in traces kept in data/standin (outside the package)."""
from __future__ import annotations

import numpy as np
import pytest

from traces.compact import CompactConfig, compact_trace
from traces.defaults import DATA_DIR, resolve_trace, shipped_traces, standin_root
from traces.errors import UserError
from traces.format import load_trace, tally_experts
from traces.model_spec import ModelSpec, load_model_spec
from traces.synthetic import SyntheticParams, generate_synthetic

SMALL = ModelSpec(name="small", num_layers=3, num_experts=8, top_k=2, hidden_size=64, expert_intermediate_size=128)
STANDIN_MODELS = {"mixtral-8x7b", "qwen1.5-moe", "phi-3.5-moe"}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    params = SyntheticParams(requests=6, prompt_tokens=(5, 9), output_tokens=(4, 12))
    return load_trace(generate_synthetic(tmp_path_factory.mktemp("src") / "t", SMALL, params))


def test_compaction_keeps_requests_prefill_counts_and_capped_decode(source, tmp_path):
    out = load_trace(compact_trace(CompactConfig(src=str(source.path), out=str(tmp_path / "c"), requests=4,
                                                 decode_iters=3, topm=2)))
    assert out.num_requests == 4 and out.meta.topm == 2 and (out.prefill_iters == 0).all()
    for r in range(4):
        offset, prefill, decode = source.rows(r)
        assert prefill > 0  # the source records every prompt token
        np.testing.assert_array_equal(out.prefill_counts[r],
                                      tally_experts(source.experts[offset:offset + prefill], SMALL.num_experts))
        kept = min(decode, 3)
        new_offset, _, new_decode = out.rows(r)
        assert new_decode == kept
        np.testing.assert_array_equal(out.experts[new_offset:new_offset + kept],
                                      source.experts[offset + prefill:offset + prefill + kept])
        row, old = out.requests.iloc[r], source.requests.iloc[r]
        assert row["prompt_tokens"] == old["prompt_tokens"]
        assert row["output_tokens"] == old["output_tokens"] - (decode - kept)
    [step] = out.source.details["compactions"]
    assert step["requests"] == "first 4 of 6" and step["source_realism"] == source.meta.realism


def test_compaction_records_a_real_profile_of_the_same_shape(tmp_path):
    params = SyntheticParams(requests=2, prompt_tokens=(2, 3), output_tokens=(2, 3))
    mixtral_shape = ModelSpec(name="standin", num_layers=32, num_experts=8, top_k=2, hidden_size=64,
                              expert_intermediate_size=224)
    src = generate_synthetic(tmp_path / "s", mixtral_shape, params)
    out = load_trace(compact_trace(CompactConfig(src=str(src), out=str(tmp_path / "c"), model="mixtral-8x7b")))
    assert out.model == load_model_spec("mixtral-8x7b")
    assert out.source.details["compactions"][0]["own_model_spec"]["hidden_size"] == 64
    with pytest.raises(UserError, match="pick a profile of the trace's routing shape"):
        compact_trace(CompactConfig(src=str(src), out=str(tmp_path / "q"), model="qwen1.5-moe"))
    assert not (tmp_path / "q").exists()


def test_bad_compaction_settings_are_one_line_errors():
    with pytest.raises(UserError, match="decode_iters=0 must be at least 1"):
        CompactConfig(src="x", out="y", decode_iters=0)
    with pytest.raises(UserError, match="embed=bert unknown"):
        CompactConfig(src="x", out="y", embed="bert")


@pytest.mark.skipif(not standin_root().is_dir(), reason="stand-in traces (data/standin) not present")
def test_shipped_stand_in_traces_are_labelled_compact_and_named():
    names = [n for n in shipped_traces() if n.startswith("standin/")]
    assert {load_trace(resolve_trace(n)).model.name for n in names} == STANDIN_MODELS
    for name in names:
        trace = load_trace(resolve_trace(name))
        assert trace.source.weights_origin.startswith("trained stand-in")
        assert trace.source.model.startswith("standin-") and trace.meta.realism["token_reuse"] is not None
        assert trace.meta.default_embedding == "minilm" and trace.num_requests >= 100
    total = sum(f.stat().st_size for f in standin_root().rglob("*") if f.is_file())
    assert total <= 25e6


def test_the_default_trace_is_real_routing_and_package_data_stays_small():
    from traces.defaults import DEFAULT_TRACE
    from traces.stats import real_traces

    assert DEFAULT_TRACE in real_traces("gpt-oss-20b")
    trace = load_trace(resolve_trace("default"))
    assert trace.source.model == "openai/gpt-oss-20b" and trace.meta.realism["distance_to_real"] == 0.0
    total = sum(f.stat().st_size for f in DATA_DIR.rglob("*") if f.is_file())
    assert total <= 30e6  # everything under traces/data ships in the wheel


def test_a_missing_stand_in_trace_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("MOE_STANDIN_DATA", str(tmp_path / "none"))
    with pytest.raises(UserError, match="stand-in traces are not installed here"):
        resolve_trace("standin/mixtral-8x7b-sharegpt")
