"""The simulator on hand-built traces: exact hit counts, exact timelines, invariants."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import registered, tiny_model, unit_hardware
from policies import Policy, PrefetchPlan
from sim.api import simulate
from sim.config import SimConfig
from sim.errors import ConfigError, PolicyError


def run(trace, policy="lru", budget="2experts", hardware=None, **kwargs):
    return simulate(SimConfig(policy=policy, budget=budget, hardware=(hardware or unit_hardware()).to_dict(), **kwargs),
                    trace=trace)


def decode_only(sequence):
    """One request, one layer, top-1: the expert of each decode step."""
    return [[[[e]] for e in sequence]]


@pytest.mark.parametrize("sequence, lru_hits, belady_hits", [
    ([0, 1, 2, 0, 1, 3, 0], 0, 2),  # LRU thrashes a loop one larger than the cache
    ([0, 1, 0, 2, 1, 0], 1, 2),
    ([0, 0, 0, 1, 1, 0], 4, 4),
])
def test_golden_hit_counts_with_two_slots(make_trace, sequence, lru_hits, belady_hits):
    trace = make_trace(tiny_model(), decode_only(sequence))
    for policy, hits in (("lru", lru_hits), ("belady", belady_hits)):
        metrics = run(trace, policy).metrics
        assert metrics.expert_uses == len(sequence)
        assert round(metrics.hit_rate * len(sequence)) == hits, policy
        assert metrics.bytes_h2d == (len(sequence) - hits) * trace.model.bytes_per_expert


def test_exact_timeline_of_a_miss_then_a_hit(make_trace):
    # non-expert 0.01 s, copy 1 s, expert 0.1 s: token 1 = 0.01 + 1 + 0.1, token 2 = 0.01 + 0.1
    trace = make_trace(tiny_model(), decode_only([2, 2]))
    result = run(trace, budget="1expert")
    m = result.metrics
    assert m.ttft_mean_s == pytest.approx(1.11)
    assert m.tpot_mean_s == pytest.approx(0.11)
    assert m.stall_s == pytest.approx(1.0)
    assert result.per_request["e2e_s"].iloc[0] == pytest.approx(1.22)


class NextLayerHint(Policy):
    """Test policy: at each layer, prefetch the expert the next layer will use (given up front)."""

    def __init__(self, hints):
        self.hints = hints

    def on_layer_start(self, step, layer, probs, experts):
        if layer + 1 in self.hints:
            return PrefetchPlan([((layer + 1, self.hints[layer + 1], 0), 1.0)])
        return None


_next_layer_hint = registered(("test_next_layer_hint", NextLayerHint))


def test_prefetch_overlaps_but_never_jumps_ahead_of_a_demand(make_trace):
    # Two layers, top-1: A at layer 0, B at layer 1. The demand for A goes first (0.01 -> 1.01),
    # the prefetch of B follows (1.01 -> 2.01) while A computes; layer 1 waits for B until 2.01.
    trace = make_trace(tiny_model(layers=2), [[[[0], [1]], [[0], [1]]]])
    hinted = run(trace, "test_next_layer_hint", policy_params={"hints": {1: 1}})
    plain = run(trace, "lru")
    assert hinted.metrics.ttft_mean_s == pytest.approx(2.11)
    assert plain.metrics.ttft_mean_s == pytest.approx(0.01 + 1 + 0.1 + 0.01 + 1 + 0.1)
    layers = hinted.per_layer
    assert list(layers["misses"]) == [1, 0] and list(layers["late_prefetches"]) == [0, 1]
    assert list(layers["hits"]) == [1, 1]  # second token: both resident
    assert hinted.metrics.prefetch_hit_rate == 0  # B was used while in flight, never as a prefetch hit


def test_prefill_needs_the_union_of_its_tokens_experts(make_trace):
    # Prefill of three prompt tokens using experts 0, 1, 1 at the single layer, then one decode step.
    trace = make_trace(tiny_model(), [[[[0]], [[1]], [[1]], [[1]]]], prefill=[3])
    result = run(trace, budget="2experts")
    layers = result.per_layer
    assert layers["expert_uses"].iloc[0] == 3  # 2 in the prefill pass (union), 1 in the decode step
    assert layers["hits"].iloc[0] == 1
    assert result.metrics.steps == 2
    # prefill: 0.01 + copy of 0 (until 1.01); 0 computes while 1 copies (until 2.01); compute 1
    assert result.metrics.ttft_mean_s == pytest.approx(2.11)


def test_budget_below_a_layers_needs_still_runs_in_availability_order(make_trace):
    # Top-2 with room for one expert: each expert is loaded, computed, then replaced.
    trace = make_trace(tiny_model(experts=4, top_k=2), [[[[0, 1]], [[0, 1]]]])
    result = run(trace, budget="1expert")
    assert result.metrics.hit_rate == pytest.approx(0.25)  # expert 1 stays from token 1 into token 2
    assert result.metrics.gpu_mem_high_water_bytes == trace.model.bytes_per_expert


def test_all_resident_never_copies(make_trace):
    trace = make_trace(tiny_model(), decode_only([0, 1, 2, 3]))
    m = run(trace, "all_resident", budget="1expert").metrics
    assert (m.hit_rate, m.bytes_h2d, m.stall_s) == (1.0, 0, 0)
    assert m.gpu_mem_high_water_bytes == 4 * trace.model.bytes_per_expert


def test_warm_start_loads_an_even_share_before_the_first_request(make_trace):
    trace = make_trace(tiny_model(), decode_only([0, 1, 0, 1]))
    assert run(trace, budget="2experts", warm_start=True).metrics.hit_rate == 1.0
    assert run(trace, budget="2experts").metrics.hit_rate == 0.5


def test_poisson_arrivals_queue_requests_and_are_seeded(make_trace):
    trace = make_trace(tiny_model(), [[[[0]]] * 3] * 6)
    first = run(trace, arrival="poisson", rate_rps=2.0, seed=3).metrics
    again = run(trace, arrival="poisson", rate_rps=2.0, seed=3).metrics
    other = run(trace, arrival="poisson", rate_rps=2.0, seed=4).metrics
    assert first == again and first.ttft_mean_s != other.ttft_mean_s
    with pytest.raises(ConfigError, match="arrival_s"):
        run(trace, arrival="trace")


class GreedyEvictor(Policy):
    """Test policy that breaks the contract: evicts a block of the running layer."""

    def choose_victims(self, incoming, need_bytes, cache):
        return [] if cache.free_bytes() >= need_bytes else [next(iter(cache.resident_blocks()))]


_greedy_evictor = registered(("test_greedy_evictor", GreedyEvictor))


def test_a_policy_cannot_evict_what_the_running_layer_pins(make_trace):
    trace = make_trace(tiny_model(experts=4, top_k=2), [[[[0, 1]], [[0, 2]]]])  # 0 stays pinned for 2
    with pytest.raises(PolicyError, match="not evictable"):
        run(trace, "test_greedy_evictor", budget="2experts")


def random_trace(make_trace, seed, layers, experts, top_k, requests=3, max_len=12):
    """Uniformly random routing, each request 1..max_len decode steps."""
    rng = np.random.default_rng(seed)
    model = tiny_model(layers=layers, experts=experts, top_k=top_k)
    reqs = []
    for _ in range(requests):
        n = int(rng.integers(1, max_len))
        reqs.append([[list(rng.choice(experts, size=top_k, replace=False)) for _ in range(layers)] for _ in range(n)])
    return make_trace(model, reqs)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10**6), layers=st.integers(1, 3), experts=st.integers(2, 6), top_k=st.integers(1, 2),
       slots=st.integers(1, 10))
def test_belady_never_loses_to_lru_and_the_budget_holds(make_trace, seed, layers, experts, top_k, slots):
    top_k = min(top_k, experts)
    trace = random_trace(make_trace, seed, layers, experts, top_k)
    budget = f"{slots}experts"
    results = {(p, s): run(trace, p, budget, policy_params={"scope": s}).metrics
               for p in ("lru", "belady") for s in ("global", "per_layer")}
    capacity = slots * trace.model.bytes_per_expert
    assert all(m.gpu_mem_high_water_bytes <= capacity for m in results.values())
    for scope in ("global", "per_layer"):
        assert results["belady", scope].hit_rate >= results["lru", scope].hit_rate - 1e-12
    assert results["belady", "global"].hit_rate >= results["lru", "per_layer"].hit_rate - 1e-12


def test_identical_inputs_give_identical_results(make_trace):
    trace = random_trace(make_trace, 7, layers=3, experts=6, top_k=2, requests=5)
    a, b = run(trace, "lru", "3experts"), run(trace, "lru", "3experts")
    assert a.metrics == b.metrics
    assert a.per_request.equals(b.per_request) and a.per_layer.equals(b.per_layer)


def test_warming_a_fragmenting_cache_charges_no_slide_to_the_first_copy():
    from sim.placement import PlacedCache, Placement
    from sim.replay import warm

    sizes = {0: 1000, 1: 1500}  # bytes of part 0 and part 1: unequal blocks fragment the arena
    cache = PlacedCache(3500, lambda block: sizes[block[2]], Placement(3500, set(sizes.values())))
    placed = warm(cache, Policy(), [(0, 0, 0), (0, 1, 0), (0, 2, 0), (0, 3, 1)])  # the last evicts, then slides
    assert (0, 3, 1) in placed and cache.pool.compactions == 1
    assert cache.take_slid_bytes() == 0


def test_the_host_observer_sees_every_host_call_in_the_one_hook_order(make_trace):
    from sim.api import execute, prepare
    trace = make_trace(tiny_model(), decode_only([2, 2]))
    run_ = prepare(SimConfig(policy="lru", budget="1expert", hardware=unit_hardware().to_dict(), engine="simpy"), trace)
    calls = []
    execute(run_, observer=lambda name, seconds: calls.append(name))
    step = ["on_step_start", "apply_plan", "on_layer_start", "start_layer"]
    # the first token's expert is copied and its landing handled; the second token's is resident
    assert calls == ["on_request_start", "apply_plan", *step, "chunk_landed", "on_step_end", *step, "on_step_end",
                     "on_request_end"]
    with pytest.raises(ConfigError, match="needs engine=simpy"):
        execute(prepare(SimConfig(policy="lru", budget="1expert", hardware=unit_hardware().to_dict()), trace),
                observer=lambda name, seconds: None)


def test_policy_host_time_is_measured_per_layer_and_per_pass(make_trace):
    from realrun.policy_host import host_times
    trace = make_trace(tiny_model(), decode_only([0, 1, 2, 0, 1]))
    hooks, carried_out = host_times(trace, "lru", "2experts", unit_hardware())
    assert 0 < hooks.layer_s < carried_out.layer_s and 0 < hooks.step_s < carried_out.step_s
    assert carried_out.land_s > 0 and hooks.land_s == 0  # landings: the protocol's work, no hook's


def test_policy_host_time_is_charged_by_budget_and_landings_beyond_lrus(make_trace):
    from realrun.policy_host import SHARES, policy_host_times
    trace = make_trace(tiny_model(experts=8), decode_only([0, 1, 2, 3, 4, 5, 6, 7] * 2))
    charged, _ = policy_host_times(trace, unit_hardware(), policies=["lru", "belady"])
    for time in charged.values():
        assert [row[0] for row in time.by_budget] == list(SHARES)
        assert (time.layer_s, time.step_s, time.land_s) == dict((r[0], r[1:]) for r in time.by_budget)[0.5]
    assert all(row[3] == 0.0 for row in charged["lru"].by_budget)  # lru is the landings' baseline


class ReplacingGuesser(Policy):
    """Test policy: after each router, replaces its queue with two guesses for the next layer."""

    def bind(self, ctx):
        super().bind(ctx)
        self.asked, self.cancelled = set(), []

    def on_layer_start(self, step, layer, probs, experts):
        nxt = (layer + 1) % self.ctx.model.num_layers
        blocks = [(nxt, (step.index + k) % self.ctx.model.num_experts, 0) for k in (1, 2)]
        self.asked.update(blocks)
        return PrefetchPlan([(b, 1.0) for b in blocks], replace=True)

    def on_copy_cancelled(self, block):
        self.cancelled.append(block)


_replacing_guesser = registered(("test_replacing_guesser", ReplacingGuesser))


@pytest.mark.parametrize("budget", ["1expert", "3experts"])
def test_the_policy_hears_of_every_prefetch_cancelled_or_dropped(make_trace, budget):
    from sim.api import execute, prepare
    rng = np.random.default_rng(3)
    trace = make_trace(tiny_model(layers=3, experts=4), [[[[int(e)] for e in rng.integers(0, 4, 3)] for _ in range(12)]])
    run_ = prepare(SimConfig(policy="test_replacing_guesser", budget=budget, hardware=unit_hardware(copy_s=1.0).to_dict()),
                   trace)
    m = execute(run_).metrics
    policy = run_.policy
    assert m.prefetches_cancelled + m.prefetches_dropped > 0
    assert len(policy.cancelled) == m.prefetches_cancelled + m.prefetches_dropped
    assert set(policy.cancelled) <= policy.asked


def test_the_library_takes_victims_from_the_order_only_until_the_block_fits():
    from policies.victims import until_fits
    from sim.cache import ExpertCache
    cache = ExpertCache(300, lambda block: 100)
    for e in range(3):
        cache.reserve((0, e, 0))
        cache.commit((0, e, 0), prefetched=False)
    cache.pin((0, 1, 0))
    pulled = []

    def order():
        for block in [(0, 1, 0), (0, 2, 0), (0, 0, 0)]:
            pulled.append(block)
            yield block
    assert until_fits(order(), 100, cache) == [(0, 2, 0)]  # the pinned block is passed over
    assert pulled == [(0, 1, 0), (0, 2, 0)]  # and the order not asked beyond the need
    assert until_fits(iter([(0, 2, 0)]), 100, cache, [(0, 0, 0)]) == [(0, 0, 0)]  # chosen ones count first
    assert until_fits(iter([(0, 1, 0)]), 200, cache) == []  # the order ran out: the cache refuses that
