"""Our policy (policies/reuse.py): each rule on hand-built cases whose decision is known exactly."""
import numpy as np
import pytest

from conftest import tiny_model
from policies import PolicyContext, Step, make_policy
from policies.base import Timing
from sim.cache import ExpertCache

S = tiny_model().bytes_per_expert


def bound(model, slots, copy_layers=2.5, **params):
    """Bound to one GPU's cache of `slots` experts; one copy takes `copy_layers` layers' compute."""
    policy = make_policy("reuse", **params)
    cache = ExpertCache(slots * S, lambda b: S)
    timing = Timing(lambda nbytes: copy_layers * 1e-3, lambda tokens: 0.0, lambda tokens: 1e-3)
    policy.bind(PolicyContext(model, [cache], lambda layer, expert: 0, lambda gpu: list(range(model.num_layers)),
                              np.random.default_rng(0), timing=timing))
    return policy, cache


def load(cache, policy, *blocks):
    for block in blocks:
        cache.reserve(block)
        cache.commit(block, prefetched=False)
        policy.on_copy_done(block, False)


def step():
    return Step(0, "decode", (0,), np.zeros(1, dtype=np.intp))


def test_reach_is_the_layers_one_copy_takes():
    assert bound(tiny_model(layers=8), 4, copy_layers=2.5)[0].reach == 3
    assert bound(tiny_model(layers=8), 4, copy_layers=0.2)[0].reach == 1


def test_evicts_the_farthest_expected_next_use():
    model = tiny_model(layers=4, experts=4)
    policy, cache = bound(model, 3, prefetch="none", preload=False)
    load(cache, policy, (1, 0, 0), (2, 0, 0), (3, 0, 0))
    policy.recent[:] = 0.5
    policy.recent[3, 0] = 0.1  # used once in ten passes: expected 1 + 4 * 9 layers away
    policy.on_layer_start(step(), 0, np.zeros((1, 4)), (1,))
    assert policy.choose_victims((0, 2, 0), S, cache) == [(3, 0, 0)]
    # equal chances: the expert whose layer runs again last goes first (layer 1 right after layer 0 ... 3)
    policy.recent[1:, 0] = 0.5
    assert policy.choose_victims((0, 2, 0), S, cache) == [(3, 0, 0)]
    policy.on_layer_start(step(), 2, np.zeros((1, 4)), (1,))  # from layer 2: layer 3 next, then 1 (wrapping)
    assert policy.choose_victims((0, 2, 0), S, cache) == [(2, 0, 0)]


def test_fit_learns_uses_per_pass_and_co_occurrence_reach_layers_ahead():
    from traces import Provenance, TraceWriter, load_trace
    import tempfile
    model = tiny_model(layers=4, experts=4, top_k=1)
    chosen = np.array([[0, 1, 2, 3], [0, 1, 2, 2], [1, 1, 1, 3], [0, 0, 2, 3]])  # 4 passes x 4 layers
    probs = np.zeros((4, 4, 4), dtype=np.float32)
    np.put_along_axis(probs, chosen[..., None], 1.0, axis=-1)
    with tempfile.TemporaryDirectory() as tmp:
        with TraceWriter(f"{tmp}/t", model, Provenance("tiny", "hand-built", "test", "test")) as w:
            w.add_request(request_id="r", dataset="test", probs=probs)
        trace = load_trace(f"{tmp}/t")
        policy, _ = bound(model, 4, copy_layers=2.5, width=1)  # reach 3: layer 0 -> layer 3
        policy.fit(trace, [0])
    assert policy.prior[0].tolist() == [0.75, 0.25, 0.0, 0.0]
    # expert 0 at layer 0 (passes 0, 1, 3) is followed at layer 3 by 3, 2, 3
    assert policy.cooc[0, 0, 0].tolist() == pytest.approx([0.0, 0.0, 1 / 3, 2 / 3])
    assert policy.cooc[0, 1].sum() == 0  # layer 1 + 3 is past the last layer


def test_timely_prefetch_targets_reachable_layers_and_is_declined_against_likelier_experts():
    model = tiny_model(layers=6, experts=4)
    policy, cache = bound(model, 3, copy_layers=1.5, preload=False, min_q=0.5, width=1)  # reach 2
    policy.cooc[0, 0, 1] = [0.0, 0.0, 0.9, 0.4]  # after expert 1 at layer 0: layer 2's expert 2 at 0.9
    # expert 1 is not resident: its demand copy goes first, the prefetch could land only by layer 3
    assert policy.on_layer_start(step(), 0, np.zeros((1, 4)), (1,)).blocks == []
    load(cache, policy, (0, 1, 0))
    plan = policy.on_layer_start(step(), 0, np.zeros((1, 4)), (1,))
    assert plan.replace and plan.blocks == [((2, 2, 0), pytest.approx(1.9))]
    load(cache, policy, (4, 0, 0), (5, 0, 0))
    policy.recent[0, 1], policy.recent[4, 0], policy.recent[5, 0] = 0.95, 0.95, 0.2
    assert policy.choose_victims((2, 2, 0), S, cache) == [(5, 0, 0)]  # 0.2 < 0.9: worth it
    policy.recent[5, 0] = 0.95
    assert policy.choose_victims((2, 2, 0), S, cache) is None  # every victim likelier than the prefetch
    assert policy.choose_victims((0, 3, 0), S, cache) is not None  # a demand copy is never declined


def test_preload_fills_free_room_by_frequency_and_never_evicts():
    model = tiny_model(layers=2, experts=4)
    policy, cache = bound(model, 4, prefetch="none")
    policy.prior[:] = [[0.1, 0.5, 0.2, 0.0], [0.4, 0.0, 0.3, 0.0]]
    plan = policy.on_request_start(None)
    assert [block for block, _ in plan.blocks] == [(0, 1, 0), (1, 0, 0), (1, 2, 0), (0, 2, 0)]
    load(cache, policy, (0, 1, 0), (1, 0, 0), (1, 2, 0), (1, 3, 0))  # a demand copy took the last room
    assert policy.choose_victims((0, 2, 0), S, cache) is None  # the queued preload of (0, 2) evicts nothing


def test_the_running_requests_own_count_pulls_the_frequency_and_a_new_request_starts_afresh():
    model = tiny_model(layers=2, experts=4)
    policy, cache = bound(model, 2, prefetch="none", preload=False, prior_weight=1.0, prior_passes=4.0)
    policy.prior[:] = 0.1
    for _ in range(4):  # expert 1 of layer 0 in each of the request's 4 passes, expert 2 in none
        policy.on_layer_start(step(), 0, np.zeros((1, 4)), (1,))
    assert policy.use_chance(np.array([0, 0]), np.array([1, 2])) == pytest.approx([(4 + 4 * 0.1) / 8, 4 * 0.1 / 8])
    load(cache, policy, (0, 1, 0), (0, 2, 0))
    assert policy.choose_victims((1, 0, 0), S, cache) == [(0, 2, 0)]
    policy.on_request_start(None)
    assert policy.use_chance(np.array([0]), np.array([1])) == pytest.approx([0.1])  # the training frequency again
    infinite, _ = bound(model, 2, prefetch="none", preload=False, prior_weight=1.0)  # the default: training's alone
    infinite.prior[:] = 0.1
    infinite.on_layer_start(step(), 0, np.zeros((1, 4)), (1,))
    assert infinite.use_chance(np.array([0]), np.array([1])) == pytest.approx([0.1])
