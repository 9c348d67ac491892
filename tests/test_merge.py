import numpy as np
import pytest

from conftest import tiny_model, write_trace
from traces import Provenance, TraceWriter, UserError, load_trace
from traces.merge import merge_traces

MODEL = tiny_model(layers=2, experts=4, top_k=1)


def part(path, ids, seed, topm=None, lookahead=True, source=Provenance("m", "none", "d", "tests")):
    rng = np.random.default_rng(seed)
    writer = TraceWriter(path, MODEL, source, topm=topm, default_embedding="e")
    for rid in ids:
        n = int(rng.integers(2, 6))
        probs = rng.dirichlet(np.ones(4), size=(n, 2)).astype(np.float32)
        writer.add_request(request_id=rid, dataset="d", probs=probs, prefill_iters=1, prompt=f"p{rid}",
                           embeddings={"e": rng.normal(size=3)},
                           lookahead=rng.random((n, 2, 1, 4)) if lookahead else None)
    return load_trace(writer.close(extra={"part": seed}))


def request_rows(trace, rid):
    r = list(trace.requests["request_id"]).index(rid)
    offset, prefill, decode = trace.rows(r)
    rows = slice(offset, offset + prefill + decode)
    return trace.probs(rows), trace.experts[rows], trace.lookahead[rows], trace.embedding("e")[r], trace.prefill_counts[r]


@pytest.mark.parametrize("topm", [None, 2])
def test_merge_keeps_every_request_exactly_in_the_given_order(tmp_path, topm):
    a = part(tmp_path / "a", ["r0", "r2"], 0, topm)
    b = part(tmp_path / "b", ["r1"], 1, topm)
    merged = load_trace(merge_traces([a.path, b.path], tmp_path / "m", order=["r0", "r1", "r2"]))
    assert list(merged.requests["request_id"]) == ["r0", "r1", "r2"]
    assert list(merged.requests["prompt"]) == ["pr0", "pr1", "pr2"]
    assert merged.meta.probs_layout == a.meta.probs_layout and merged.meta.extra == {"part": 0}
    for source in (a, b):
        for rid in source.requests["request_id"]:
            for got, want in zip(request_rows(merged, rid), request_rows(source, rid)):
                np.testing.assert_array_equal(got, want)


def test_parts_that_do_not_fit_together_are_refused_and_nothing_is_written(tmp_path):
    a = part(tmp_path / "a", ["r0"], 0)
    with pytest.raises(UserError, match="request ids repeat"):
        merge_traces([a.path, part(tmp_path / "b", ["r0"], 1).path], tmp_path / "m")
    with pytest.raises(UserError, match="probability layout differs"):
        merge_traces([a.path, part(tmp_path / "c", ["r1"], 1, topm=2).path], tmp_path / "m")
    with pytest.raises(UserError, match="lookahead given for some requests"):
        merge_traces([a.path, part(tmp_path / "d", ["r1"], 1, lookahead=False).path], tmp_path / "m")
    other = write_trace(tmp_path / "e", tiny_model(layers=1), [[[[0]]]])
    with pytest.raises(UserError, match="model tiny differs"):
        merge_traces([a.path, other], tmp_path / "m")
    with pytest.raises(UserError, match="order names 1 requests"):
        merge_traces([a.path, part(tmp_path / "f", ["r1"], 1).path], tmp_path / "m", order=["r0"])
    assert not (tmp_path / "m").exists()


def test_provenance_must_agree_unless_given(tmp_path):
    a = part(tmp_path / "a", ["r0"], 0)
    b = part(tmp_path / "b", ["r1"], 1, source=Provenance("other", "none", "d", "tests"))
    with pytest.raises(UserError, match="provenance differs"):
        merge_traces([a.path, b.path], tmp_path / "m")
    merged = load_trace(merge_traces([a.path, b.path], tmp_path / "m", source=Provenance("x", "y", "z", "t")))
    assert merged.source.model == "x" and merged.num_requests == 2
