"""Unknown router probabilities (topm traces) are never read as zero.

Three traces agree on every recorded value: C records only the top 4 of 8 probabilities (the rest
unknown), R writes the shared estimate (policies.base.known_probs) into the unknowns, Z writes 0.
Every registered policy must behave on C exactly as on R; a policy that takes unknown for "never
chosen" behaves as on Z instead, and the check catches it (the deliberately wrong toy below).
"""
import json

import numpy as np
import pytest

from conftest import registered, tiny_model, unit_hardware
from policies import PrefetchPlan, available, policy_class
from policies.base import known_probs
from policies.lru import LRU
from sim.api import simulate
from sim.config import SimConfig
from traces import Provenance, TraceWriter, load_trace

MODEL = tiny_model(layers=4, experts=8, top_k=2)
RECORDED = np.array([0.3125, 0.1875, 0.125, 0.125], dtype=np.float32)  # 0.75 recorded: 0.0625 each for the rest
HIDDEN_FIELDS = {"trace", "trace_origin", "trace_token_reuse", "trace_distance_to_real"}


def test_estimate_shares_the_unrecorded_mass_below_the_smallest_recorded():
    probs = np.array([[0.5, np.nan, 0.3, np.nan], [0.6, 0.4, np.nan, np.nan], [0.9, 0.05, np.nan, np.nan]])
    np.testing.assert_allclose(known_probs(probs), [[0.5, 0.1, 0.3, 0.1], [0.6, 0.4, 0.0, 0.0],
                                                    [0.9, 0.05, 0.025, 0.025]], atol=1e-7)
    full = np.array([[0.7, 0.2, 0.1, 0.0]], dtype=np.float32)
    assert known_probs(full) is full


def _write(path, fill, topm):
    rng = np.random.default_rng(5)
    writer = TraceWriter(path, MODEL, Provenance("test", "none", "hand-built", "tests"), topm=topm, overwrite=True)
    for r in range(6):
        rows = 14
        order = np.argsort(rng.random((rows, MODEL.num_layers, MODEL.num_experts)), axis=-1)
        probs = np.full((rows, MODEL.num_layers, MODEL.num_experts), fill, dtype=np.float32)
        np.put_along_axis(probs, order[..., :4], np.broadcast_to(RECORDED, order[..., :4].shape), axis=-1)
        writer.add_request(request_id=f"r{r}", dataset="test", probs=probs, experts=order[..., :2], prefill_iters=2,
                           embeddings={"e": rng.normal(size=8)})
    return load_trace(writer.close())


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("unknown")
    return {"C": _write(tmp / "c", np.nan, topm=4), "R": _write(tmp / "r", 0.0625, topm=None),
            "Z": _write(tmp / "z", 0.0, topm=None)}


def runs(traces, name):
    """Metrics on C, R and Z (trace names aside)."""
    cfg = dict(policy=name, budget="10experts", hardware=unit_hardware(copy_s=0.05, expert_s=0.01).to_dict(),
               train_fraction=0.34 if policy_class(name).needs_training else 0.0)
    out = {}
    for key, trace in traces.items():
        m = simulate(SimConfig(trace=str(trace.path), **cfg), trace=trace).metrics.to_dict()
        # as JSON text: NaN figures (a policy's undefined statistic) compare equal
        out[key] = json.dumps({k: v for k, v in m.items() if k not in HIDDEN_FIELDS}, sort_keys=True, default=str)
    return out


def test_the_trace_says_which_probabilities_are_unknown(traces):
    c, r = traces["C"], traces["R"]
    assert c.probs_known == "topm" and r.probs_known == "full"
    assert np.isnan(c.probs(slice(0, 3))).sum(axis=-1).tolist() == [[4] * 4] * 3
    np.testing.assert_array_equal(known_probs(c.probs(slice(None))), r.probs(slice(None)))


class _ByProbability(LRU):
    """Prefetches, at layer l+1, every expert whose probability at layer l may exceed 0.05."""

    numbers = staticmethod(known_probs)

    def on_layer_start(self, step, layer, probs, experts):
        super().on_layer_start(step, layer, probs, experts)
        if layer + 1 == self.ctx.model.num_layers:
            return None
        p = self.numbers(probs).max(axis=0)
        return PrefetchPlan([((layer + 1, int(e), 0), float(p[e])) for e in np.flatnonzero(p > 0.05)])


class _Estimated(_ByProbability):
    pass


class _AsZero(_ByProbability):
    numbers = staticmethod(np.nan_to_num)  # wrong: an unknown probability becomes "never chosen"


_policies = registered(("test_unknown_estimated", _Estimated), ("test_unknown_as_zero", _AsZero))


@pytest.mark.parametrize("name", available())
def test_every_policy_reads_unknown_as_the_estimate(traces, name):
    got = runs(traces, name)
    assert got["C"] == got["R"]


def test_the_check_catches_a_policy_that_reads_unknown_as_zero(traces):
    right, wrong = runs(traces, "test_unknown_estimated"), runs(traces, "test_unknown_as_zero")
    assert right["R"] != right["Z"]  # the toy does depend on the unknown values
    assert right["C"] == right["R"]
    assert wrong["C"] == wrong["Z"] != wrong["R"]  # what test_every_policy_reads_unknown_as_the_estimate rejects
