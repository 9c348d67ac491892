import numpy as np
import pytest

from traces import UserError, load_trace
from traces.stats import token_reuse
from traces.model_spec import load_model_spec
from traces.synthetic import SyntheticParams, generate_synthetic

MIXTRAL = load_model_spec("mixtral-8x7b")


def make(tmp_path, name, **params):
    return load_trace(generate_synthetic(tmp_path / name, MIXTRAL, SyntheticParams(**params)))


def test_same_seed_same_trace_and_prefill_rows_come_first(tmp_path):
    a = make(tmp_path, "a", requests=4, seed=5)
    b = make(tmp_path, "b", requests=4, seed=5)
    np.testing.assert_array_equal(a.dense_probs(), b.dense_probs())
    np.testing.assert_array_equal(a.embedding(), b.embedding())
    for r in range(4):
        _, prefill, decode = a.rows(r)
        row = a.requests.iloc[r]
        assert prefill == row["prompt_tokens"] and decode == row["output_tokens"] - 1
        assert (a.prefill_counts[r].sum(axis=1) == prefill * MIXTRAL.top_k).all()


def test_locality_knobs_move_token_reuse(tmp_path):
    uniform = token_reuse(make(tmp_path, "u", requests=8, skew=0, topic_strength=0, layer_correlation=0, stickiness=0))
    sticky = token_reuse(make(tmp_path, "s", requests=8, stickiness=3.0))
    assert uniform == pytest.approx(MIXTRAL.top_k / MIXTRAL.num_experts, abs=0.03)
    assert sticky > uniform + 0.3


def test_topics_make_embeddings_cluster(tmp_path):
    trace = make(tmp_path, "t", requests=12, topics=2, embedding_noise=0.05, seed=1)
    topics = np.asarray(trace.meta.extra["topics"])
    emb = trace.embedding()
    same = np.linalg.norm(emb[topics == topics[0]] - emb[topics == topics[0]][0], axis=1).max()
    other = np.linalg.norm(emb[topics != topics[0]] - emb[topics == topics[0]][0], axis=1).min()
    assert same < other


def test_bad_parameters_are_rejected():
    with pytest.raises(UserError, match="output_tokens"):
        SyntheticParams(output_tokens=(5, 2))

