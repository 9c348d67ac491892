"""The published policies: decisions known exactly on hand-built inputs, and invariants on random traces."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import probs_from_experts, tiny_model, unit_hardware
from policies import PolicyContext, RequestInfo, Step, make_policy
from policies.finemoe import ExpertMapStore
from sim.api import simulate
from sim.cache import ExpertCache
from sim.config import SimConfig
from traces import Provenance, TraceWriter, load_trace

S = tiny_model().bytes_per_expert


def run(trace, policy, budget, hardware=None, **kwargs):
    return simulate(SimConfig(policy=policy, budget=budget, hardware=(hardware or unit_hardware()).to_dict(), **kwargs),
                    trace=trace)


def bound(name, model, slots, **params):
    """A policy bound to one GPU's empty cache of `slots` experts, to call its hooks directly."""
    policy = make_policy(name, **params)
    cache = ExpertCache(slots * model.bytes_per_expert, lambda b: model.bytes_per_expert)
    policy.bind(PolicyContext(model, [cache], lambda layer, expert: 0, lambda gpu: list(range(model.num_layers)),
                              np.random.default_rng(0)))
    return policy


def decode_step(index=0):
    return Step(index, "decode", (0,), np.zeros(1, dtype=np.intp))


def request(embedding=None):
    return RequestInfo(0, "r0", 0, 1, embedding)


# --- FineMoE ---

def test_finemoe_rdy_overwrites_the_most_redundant_map():
    # C's trajectory is nearly A's (cosine 0.994), its embedding B's: RDY = (d/L) sem + ((L-d)/L) traj
    # picks A when the trajectory weighs more (d=1 of L=4), B when the semantics do (d=3).
    a = np.tile([1.0, 0.0], (4, 1))
    b = np.tile([0.0, 1.0], (4, 1))
    ea, eb = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    for distance, overwritten in ((1, 0), (3, 1)):
        store = ExpertMapStore(capacity=2, layers=4, experts=2, distance=distance)
        store.add(a[None], ea)
        store.add(b[None], eb)
        c = np.tile([0.9, 0.1], (4, 1))
        store.add(c[None], eb)
        kept = 1 - overwritten
        assert np.allclose(store.maps[overwritten], c)
        assert np.allclose(store.maps[kept], (a, b)[kept])


@pytest.mark.parametrize("similarity, delta, expected", [
    (0.99, None, [0]),        # delta = 0.01: below the first expert's 0.5, clamped to top-1
    (0.25, None, [0]),        # delta = 0.75: 0.5 fits, 0.5 + 0.3 does not
    (0.10, None, [0, 1]),     # delta = 0.90: 0.8 fits
    (0.01, None, [0, 1, 2]),  # delta = 0.99: 0.95 fits
    (0.99, 0.96, [0, 1, 2]),  # a fixed threshold ignores the similarity
])
def test_finemoe_prefetches_the_cumulative_probability_prefix(similarity, delta, expected):
    model = tiny_model(layers=2, experts=4)
    policy = bound("finemoe", model, slots=8, delta=delta, distance=1, prefetch="paper", trajectory_window="paper")
    stored = np.array([[1.0, 0.0, 0.0, 0.0], [0.5, 0.3, 0.15, 0.05]], dtype=np.float32)
    policy.store.add(stored[None], None)
    policy.on_request_start(request())
    policy.on_step_start(decode_step())
    now = np.array([[similarity, np.sqrt(1 - similarity ** 2), 0.0, 0.0]], dtype=np.float32)
    plan = policy.on_layer_start(decode_step(), 0, now, (1,))
    assert plan.replace
    assert [block for block, _ in plan.blocks] == [(1, e, 0) for e in expected]
    # priority p / (j - l_now): layer 1 seen from layer 0
    assert [p for _, p in plan.blocks] == pytest.approx([stored[1, e] / 1 for e in expected])


def test_finemoe_semantic_search_predicts_the_first_layers_before_layer_0():
    model = tiny_model(layers=3, experts=4)
    policy = bound("finemoe", model, slots=8, distance=2, prefetch="paper")
    maps = np.zeros((2, 3, 4), dtype=np.float32)
    maps[0, :, 2] = 1.0
    maps[1, :, 3] = 1.0
    policy.store.add(maps[:1], np.array([1.0, 0.0]))
    policy.store.add(maps[1:], np.array([0.0, 1.0]))
    policy.on_request_start(request(np.array([0.1, 2.0])))
    plan = policy.on_step_start(decode_step())
    # the nearest prompt is the second; its map predicts layers 0 and 1 (d = 2) at priority p / (j + 1)
    assert [block for block, _ in plan.blocks] == [(0, 3, 0), (1, 3, 0)]
    assert [p for _, p in plan.blocks] == pytest.approx([1.0, 0.5])


def test_finemoe_searches_with_the_models_token_embeddings_when_the_trace_has_them():
    assert make_policy("finemoe").embedding_source(["minilm", "token_mean"]) == "token_mean"  # the artifact's
    assert make_policy("finemoe").embedding_source(["minilm"]) is None  # the trace's default
    assert make_policy("finemoe", embedding="minilm").embedding_source(["minilm", "token_mean"]) == "minilm"


def resident(policy, experts):
    """Layer 0's `experts` copied in on demand, as the engine does; the policy's first cache."""
    cache = policy.ctx.caches[0]
    for e in experts:
        cache.reserve((0, e, 0))
        cache.commit((0, e, 0), prefetched=False)
        policy.on_copy_done((0, e, 0), False)
    return cache


def test_finemoe_evicts_the_lowest_probability_times_frequency_first():
    model = tiny_model(layers=2, experts=4)
    policy = bound("finemoe", model, slots=3, eviction="float")
    cache = resident(policy, (0, 1, 2))
    policy.prob[0] = [0.6, 0.3, 0.1, 0.0]
    policy.freq[0] = [1, 5, 2, 0]  # p * freq: 0.6, 1.5, 0.2
    assert policy.choose_victims((1, 0, 0), S, cache) == [(0, 2, 0)]
    policy.candidates[0, 2] = True  # the latest prefetch candidates are spared
    assert policy.choose_victims((1, 0, 0), S, cache) == [(0, 0, 0)]


@pytest.mark.parametrize("row, expected", [
    ([0.3, 0.2, 0.0, 0.0], [0]),         # top-2 mass 0.5 scaled to 0.6, 0.4: 0.6 fits delta 0.75
    ([0.3, 0.2, np.nan, np.nan], [0, 2]),  # unknowns share 0.5: 0.3, 0.25 (expert 2 first), 0.25, 0.2
])
def test_finemoe_selects_on_completed_maps_not_on_the_stored_top_m_mass(row, expected):
    # Verbatim, cumsum <= 0.75 on a row of mass 0.5 selects all four experts (the bug); the rule is
    # applied to the row completed to a distribution, as the artifact's full softmax maps are.
    model = tiny_model(layers=2, experts=4)
    policy = bound("finemoe", model, slots=8, distance=1, prefetch="paper", trajectory_window="paper")
    policy.store.add(np.array([[[1.0, 0.0, 0.0, 0.0], row]], dtype=np.float32), None)
    policy.on_request_start(request())
    policy.on_step_start(decode_step())
    now = np.array([[0.25, np.sqrt(1 - 0.25 ** 2), 0.0, 0.0]], dtype=np.float32)  # similarity 0.25
    plan = policy.on_layer_start(decode_step(), 0, now, (1,))
    assert [block for block, _ in plan.blocks] == [(1, e, 0) for e in expected]


def test_finemoe_artifact_enqueues_and_protects_every_expert_of_the_window_from_l_plus_1_plus_d():
    # L = 4, d = 1: after layer 0 the window is layers 2..3 (traj_prefetch), every expert of it is
    # queued at p_selected * (1 - (j - 2) / (4 + 1)) + 1e-6, selected ones first, all candidates.
    model = tiny_model(layers=4, experts=3)
    policy = bound("finemoe", model, slots=12, distance=1)
    stored = np.array([[1, 0, 0], [0, 1, 0], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]], dtype=np.float32)
    policy.store.add(stored[None], None)
    policy.on_request_start(request())
    policy.on_step_start(decode_step())
    plan = policy.on_layer_start(decode_step(), 0, np.array([[1.0, 0.0, 0.0]], dtype=np.float32), (0,))
    # similarity 1: delta 0, top-1 per layer: expert 2 of layer 2 (0.7), expert 0 of layer 3 (0.6 * 0.8)
    assert [block for block, _ in plan.blocks][:2] == [(2, 2, 0), (3, 0, 0)]
    assert [p for _, p in plan.blocks][:2] == pytest.approx([0.7 + 1e-6, 0.6 * 0.8 + 1e-6])
    assert sorted(block for block, _ in plan.blocks[2:]) == [(2, 0, 0), (2, 1, 0), (3, 1, 0), (3, 2, 0)]
    assert all(p == pytest.approx(1e-6) for _, p in plan.blocks[2:])
    assert policy.candidates[2:].all() and not policy.candidates[:2].any()
    assert policy.prob[3].tolist() == pytest.approx([0.6, 0.3, 0.1])  # the map's, for eviction


def test_finemoe_artifact_evicts_by_truncated_prob_times_count_and_resets_on_eviction():
    model = tiny_model(layers=2, experts=4)
    policy = bound("finemoe", model, slots=3)
    cache = resident(policy, (0, 1, 2))
    policy.prob[0] = [0.6, 0.3, 0.9, 0.0]
    policy.freq[0] = [3, 5, 1, 0]  # size_t(p * count): 1, 1, 0 (the float product would rank 1 first)
    assert policy.choose_victims((1, 0, 0), S, cache) == [(0, 2, 0)]
    assert policy.prob[0, 2] == 0.0 and policy.freq[0, 2] == 0  # RemoveCachedSparseNode resets both
    policy.prob[0, 2], policy.freq[0, 2] = 0.9, 1
    # truncated scores tie at 1 for experts 0 and 1: the lower id goes first
    policy.freq[0, 2] = 2  # 1.8 -> 1
    assert policy.choose_victims((1, 0, 0), S, cache) == [(0, 0, 0)]


def test_round_robin_placement_deals_layer_expert_pairs_over_all_gpus():
    from sim.topology import Topology
    topo = Topology.build(unit_hardware(), tiny_model(layers=2, experts=4), 3, "round_robin")
    assert [[topo.home(l, e) for e in range(4)] for l in range(2)] == [[0, 1, 2, 0], [1, 2, 0, 1]]
    assert topo.layers_of(2) == [0, 1]


# --- MoE-Infinity ---

def test_moe_infinity_decays_future_layers_and_queues_them_by_score():
    model = tiny_model(layers=4, experts=4)
    policy = bound("moe_infinity", model, slots=16)
    eam = np.array([[3, 0, 0, 0], [1, 1, 0, 0], [4, 0, 0, 0], [0, 0, 0, 2]], dtype=np.float32)
    policy._store(eam)
    policy.on_request_start(request())
    plan = policy.on_layer_start(decode_step(), 0, np.zeros((1, 4)), (0,))
    # row-normalised counts times 1 - (r - l) / (L + 1): layer 1 x 0.8, layer 2 x 0.6, layer 3 x 0.4
    assert plan.replace
    assert [block for block, _ in plan.blocks] == [(2, 0, 0), (1, 0, 0), (1, 1, 0), (3, 3, 0)]
    assert [p for _, p in plan.blocks] == pytest.approx([0.6, 0.4, 0.4, 0.4])


def test_moe_infinity_replaces_the_most_similar_matrix_when_full():
    model = tiny_model(layers=2, experts=2)
    policy = bound("moe_infinity", model, slots=4, capacity=2)
    policy._store(np.array([[1, 0], [1, 0]], dtype=np.float32))
    policy._store(np.array([[0, 1], [0, 1]], dtype=np.float32))
    policy._store(np.array([[0, 3], [1, 2]], dtype=np.float32))  # closer to the second
    assert np.allclose(policy.collection[0], [[1, 0], [1, 0]])
    assert policy.collection[1, 0] == pytest.approx([0, 1])


# --- DeepSpeed, Mixtral-Offloading, ProMoE, MoEpic, oracle ---

def test_deepspeed_keeps_two_layers_resident_and_moves_every_expert_every_pass(make_trace):
    model = tiny_model(layers=3, experts=4)
    trace = make_trace(model, [[[[0], [1], [2]], [[3], [3], [3]], [[1], [0], [2]]]])
    m = run(trace, "deepspeed", "12experts").metrics
    assert m.gpu_mem_high_water_bytes == 2 * model.num_experts * S
    # every expert of every layer each pass, plus layer 0 fetched for a pass that never comes
    assert m.bytes_h2d == (m.steps * model.num_layers + 1) * model.num_experts * S


def lookahead_trace(tmp_path, steps, requests=1, signal="lookahead"):
    """Two layers, top-1: layer 0 always uses expert 0, layer 1 alternates 1, 2. Only the trace's
    extra signal tells which: layer 1's gates applied to layer 0's hidden state (lookahead), or a
    hidden-state projection that encodes it (hidden)."""
    model = tiny_model(layers=2, experts=4)
    writer = TraceWriter(tmp_path / signal, model, Provenance("test", "none", "hand-built", "tests"))
    for r in range(requests):
        experts = np.array([[[0], [1 + (t + r) % 2]] for t in range(steps)])
        extra = np.zeros((steps, 2, 1, 4) if signal == "lookahead" else (steps, 2, 4), dtype=np.float32)
        extra[np.arange(steps), 0, ..., experts[:, 1, 0]] = 1.0
        writer.add_request(request_id=f"r{r}", dataset="test", probs=probs_from_experts(experts, 4), experts=experts,
                           **{"lookahead" if signal == "lookahead" else "hidden_proj": extra})
    return load_trace(writer.close())


def test_mixtral_offload_prefetches_the_lookahead_guess(tmp_path):
    trace = lookahead_trace(tmp_path, steps=6)
    fast = unit_hardware(copy_s=0.01)
    speculative = run(trace, "mixtral_offload", "2experts", fast, policy_params={"guesses": 1}).per_layer
    plain = run(trace, "lru", "2experts", fast).per_layer
    assert list(plain["hits"]) == [5, 0]  # one slot per layer: the alternating layer always misses
    assert list(speculative["hits"]) == [5, 6]  # the guess lands before layer 1's router every time
    assert list(speculative["prefetch_hits"]) == [0, 6]


def test_promoe_learns_a_predictable_next_layer_and_reports_its_precision(make_trace):
    rng = np.random.default_rng(0)
    model = tiny_model(layers=3, experts=4)
    requests = [[[[e]] * 3 for e in rng.integers(0, 4, size=20)] for _ in range(4)]  # every layer repeats layer 0
    trace = make_trace(model, requests)
    info = run(trace, "promoe", "6experts", train_fraction=0.5).metrics.policy_info
    assert info["predictor_precision"] == 1.0 and info["predictor_recall"] == 1.0
    assert info["chunks"] == 4


@pytest.mark.parametrize("signal, source", [("lookahead", "layer l+1 gates on this hidden state"),
                                            ("hidden", "hidden state")])
def test_promoe_reads_the_hidden_state_or_the_next_gates_when_the_trace_has_them(tmp_path, signal, source):
    trace = lookahead_trace(tmp_path, steps=12, requests=4, signal=signal)
    info = run(trace, "promoe", "4experts", train_fraction=0.5, policy_params={"width": 1}).metrics.policy_info
    assert source in info["predictor_inputs"]
    assert info["predictor_precision"] == 1.0


def test_promoe_without_a_training_split_says_how_to_get_one(make_trace):
    trace = make_trace(tiny_model(), [[[[0]]]])
    with pytest.raises(Exception, match="train_fraction"):
        run(trace, "promoe", "1expert")


def test_moepic_copies_only_bottoms_of_experts_whose_tops_stay(make_trace):
    # One layer, six experts used in a loop twice, room for 5: 2 experts' room stays aside
    # (2 * top_k), the other 3 hold the tops (theta 0.5) of all 6. Round one copies whole experts
    # and sheds bottoms; round two copies only bottoms. LRU's loop misses everything twice.
    trace = make_trace(tiny_model(experts=6), [[[[e]] for e in list(range(6)) * 2]])
    result = run(trace, "moepic", "5experts", policy_params={"theta": 0.5, "allocate": False})
    info = result.metrics.policy_info
    assert info["theta_per_layer"] == [0.5] and info["top_slots_per_layer"] == [6]
    assert result.metrics.bytes_h2d == 6 * S + 6 * S // 2
    assert run(trace, "lru", "5experts").metrics.bytes_h2d == 12 * S


def test_moepic_configuration_fits_the_budget_and_reports_theta_per_layer(make_trace):
    rng = np.random.default_rng(1)
    model = tiny_model(layers=4, experts=6, top_k=2)
    requests = [[[list(rng.choice(6, 2, replace=False)) for _ in range(4)] for _ in range(15)] for _ in range(4)]
    trace = make_trace(model, requests)
    info = run(trace, "moepic", "10experts", train_fraction=0.5).metrics.policy_info
    thetas, slots = info["theta_per_layer"], info["top_slots_per_layer"]
    assert len(thetas) == 4 and all(0.1 <= t <= 1.0 for t in thetas)
    assert sum(t * s for t, s in zip(thetas, slots)) <= 10 - 2 * model.top_k + 1e-9
    assert info["allocated"] and info["fixed_point_rounds"] >= 1


def test_oracle_prefetch_hits_every_use_when_copies_are_fast(make_trace):
    # Every step needs two experts not used the step before, and the cache holds two: LRU misses
    # all; the oracle copies each one in while the layer before it runs (layer 0 before the pass).
    trace = make_trace(tiny_model(layers=2, experts=4), [[[[t % 4], [(t + 1) % 4]] for t in range(8)]])
    fast = unit_hardware(copy_s=0.005)
    assert run(trace, "oracle_prefetch", "2experts", fast).metrics.hit_rate == 1.0
    assert run(trace, "lru", "2experts", fast).metrics.hit_rate == 0.0


# --- invariants on random traces ---

NON_BOUNDS = ["lru", "mixtral_offload", "deepspeed", "moe_infinity", "finemoe", "promoe", "moepic"]


def random_requests(rng, layers, experts, top_k, requests=4):
    return [[[list(rng.choice(experts, size=top_k, replace=False)) for _ in range(layers)]
             for _ in range(int(rng.integers(2, 10)))] for _ in range(requests)]


# Derandomized: the same examples on every machine. oracle_prefetch is not a bound in every corner
# (see the xfail below), so a random search must not turn CI red by luck.
@settings(max_examples=12, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10**6), layers=st.integers(1, 3), experts=st.integers(2, 6), top_k=st.integers(1, 2),
       slots=st.integers(1, 18))
def test_budget_holds_oracle_bounds_hits_and_belady_beats_lru(make_trace, seed, layers, experts, top_k, slots):
    rng = np.random.default_rng(seed)
    top_k = min(top_k, experts)
    model = tiny_model(layers=layers, experts=experts, top_k=top_k)
    trace = make_trace(model, random_requests(rng, layers, experts, top_k),
                       embeddings=[rng.normal(size=3) for _ in range(4)])
    # Copies shorter than a layer's compute: there perfect knowledge turns needs into hits (see
    # policies/oracle_prefetch.py for why slower links bound latency, not hits).
    fast = unit_hardware(copy_s=float(rng.choice([0.02, 0.05])))
    budget = f"{slots}experts"
    metrics = {p: run(trace, p, budget, fast, train_fraction=0.25).metrics
               for p in NON_BOUNDS + ["oracle_prefetch", "belady"]}
    for name, m in metrics.items():
        assert m.gpu_mem_high_water_bytes <= slots * S, name
    oracle = metrics["oracle_prefetch"].hit_rate
    for name in NON_BOUNDS:
        assert metrics[name].hit_rate <= oracle + 1e-12, name
    assert metrics["belady"].hit_rate >= metrics["lru"].hit_rate - 1e-12


@pytest.mark.xfail(strict=True, reason="known: when one layer's experts fill most of the budget, fetching the whole "
                   "next layer (deepspeed, 61.5%) beats oracle_prefetch's schedule (57.7%); oracle_prefetch is a "
                   "heuristic with perfect knowledge, not an optimum")
def test_oracle_prefetch_bounds_deepspeed_when_a_layer_fills_the_budget(make_trace):
    rng = np.random.default_rng(1)
    model = tiny_model(layers=3, experts=2, top_k=2)
    trace = make_trace(model, random_requests(rng, 3, 2, 2), embeddings=[rng.normal(size=3) for _ in range(4)])
    fast = unit_hardware(copy_s=float(rng.choice([0.02, 0.05])))
    hit = {p: run(trace, p, "3experts", fast, train_fraction=0.25).metrics.hit_rate
           for p in ("deepspeed", "oracle_prefetch")}
    assert hit["deepspeed"] <= hit["oracle_prefetch"] + 1e-12
