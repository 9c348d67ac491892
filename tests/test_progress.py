"""Experts in unequal parts, chunked prefetches and a budget of one or two experts: every run serves
every request in both engines (the simulator used to stop silently with some unserved, realrun's
copy engine to stall), and a cache that truly cannot hold a block is refused up front."""
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import registered, tiny_model, trace_expert_uses, unit_hardware
from policies import Policy, PrefetchPlan, available, register
from sim.api import execute, prepare
from sim.config import SimConfig
from sim.errors import ConfigError, StallError
from sim.copy_scheduler import CopyScheduler
from traces import load_trace
from traces.synthetic import SyntheticParams, generate_synthetic

DECISIONS = ["hits", "prefetch_hits", "late_prefetches", "misses", "bytes_h2d"]
SLOW_COPIES = unit_hardware(copy_s=1e6).to_dict()  # copies land only while a layer waits: both engines alike
FAST_COPIES = unit_hardware(copy_s=0.05).to_dict()


def split_prefetcher(parts: tuple[float, ...], chunks: int, guesses: int, order: str = "index",
                     replace: bool = False) -> str:
    """Register (for the test calling it) a test policy: experts cut into `parts`, copied in `chunks`; after each
    router, the `guesses` likeliest experts of this layer are prefetched for the next, every part."""
    name = f"test_split_{'_'.join(map(str, parts))}_c{chunks}_g{guesses}_{order}_{'r' if replace else 'k'}"

    class SplitPrefetcher(Policy):
        copy_chunks = chunks
        compute_order = order

        def parts(self, layer):
            return parts

        def on_layer_start(self, step, layer, probs, experts):
            if layer + 1 >= self.ctx.model.num_layers:
                return None
            likely = np.argsort(-probs[0], kind="stable")[:guesses]
            return PrefetchPlan([((layer + 1, int(e), p), 2.0 - i) for i, e in enumerate(likely)
                                 for p in range(len(parts))], replace=replace and layer % 2 == 0)

    if name not in available():  # an earlier example of the same hypothesis test registered it
        register(name)(SplitPrefetcher)  # for this test only (conftest's _registry_restored)
    return name


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Three short requests on 3 layers x 4 experts, top-2, with prefills of up to 6 tokens."""
    params = SyntheticParams(requests=3, prompt_tokens=(0, 6), output_tokens=(2, 8), seed=0)
    return load_trace(generate_synthetic(tmp_path_factory.mktemp("syn") / "t", tiny_model(layers=3, experts=4, top_k=2),
                                         params))


@pytest.fixture(scope="module")
def machine(synthetic):
    return real_machine(synthetic.model, host_sources=5)


def real_machine(model, **options):
    """realrun's executor on the CPU: it needs torch, which the core install does not (skipped without)."""
    pytest.importorskip("torch")
    from realrun.executor import Machine, RealOptions

    return Machine(model, RealOptions(device="cpu", kv_tokens=8, **options))


def execute_real(run, machine):
    from realrun.api import execute_real as real

    return real(run, machine)


def config(trace, policy, budget, hardware, **kwargs):
    return SimConfig(trace=str(trace.path), policy=policy, budget=budget, hardware=hardware, **kwargs)


# (parts, chunks, guesses, budget, hardware): each one stopped the simulator before the fix.
STALLED = [
    # MoEpic's 0.4/0.6 split: a prefetch preempted half copied keeps its memory, and the demand that
    # preempted it can only find room in that memory.
    ((0.4, 0.6), 2, 3, "2experts", FAST_COPIES),
    ((0.4, 0.6), 3, 3, "2experts", FAST_COPIES),
    # 0.6/0.4: the compute order waits first for an expert whose copy needs the memory that the
    # parts of a later expert (landed, or copying) hold, pinned until that expert runs.
    ((0.6, 0.4), 1, 2, "1expert", SLOW_COPIES),
    ((0.6, 0.4), 3, 2, "1expert", SLOW_COPIES),
    ((0.6, 0.4), 2, 1, "2experts", SLOW_COPIES),
]


@pytest.mark.parametrize("parts, chunks, guesses, budget, hardware", STALLED)
def test_chunked_uneven_prefetches_under_a_budget_of_an_expert_or_two_serve_every_request(
        synthetic, parts, chunks, guesses, budget, hardware):
    prepared = prepare(config(synthetic, split_prefetcher(parts, chunks, guesses), budget, hardware))
    run = execute(prepared)
    m = run.metrics
    assert m.requests == synthetic.num_requests == len(run.per_request)
    assert m.steps == sum(synthetic.requests["output_tokens"]) and m.gpu_mem_high_water_bytes <= m.budget_bytes
    assert m.expert_uses == trace_expert_uses(synthetic, prepared.replay)


@pytest.mark.parametrize("parts, chunks, guesses, budget",
                         [(p, c, g, b) for p, c, g, b, hardware in STALLED if hardware is SLOW_COPIES])
def test_and_realrun_decides_the_same_on_them(synthetic, machine, parts, chunks, guesses, budget):
    cfg = config(synthetic, split_prefetcher(parts, chunks, guesses), budget, SLOW_COPIES)
    sim, real = execute(prepare(cfg)), execute_real(prepare(cfg), machine)
    pd.testing.assert_frame_equal(sim.per_layer[DECISIONS], real.per_layer[DECISIONS])
    assert real.metrics.requests == sim.metrics.requests == synthetic.num_requests
    assert real.metrics.evictions == sim.metrics.evictions
    assert real.metrics.gpu_mem_high_water_bytes <= real.metrics.budget_bytes


@pytest.mark.parametrize("budget", ["2experts", "3experts"])
def test_moepic_with_an_expert_or_so_per_device_serves_every_request_and_both_engines_agree(synthetic, budget):
    """The case as found: MoEpic (0.4/0.6 segments) on two devices sharing a budget of 2 or 3
    experts; the simulator stopped after 2 or 4 passes with no request served, realrun stalled."""
    hardware = unit_hardware(copy_s=1e6).to_dict() | {"gpus": 2}
    cfg = config(synthetic, "moepic", budget, hardware, budget_scope="total", gpus=2)
    sim = execute(prepare(cfg))
    real = execute_real(prepare(cfg), real_machine(synthetic.model, gpus=2, host_sources=5))
    assert sim.metrics.requests == real.metrics.requests == synthetic.num_requests
    pd.testing.assert_frame_equal(sim.per_layer[DECISIONS], real.per_layer[DECISIONS])
    assert real.metrics.gpu_mem_high_water_bytes <= real.metrics.budget_bytes


class CachedTops(Policy):
    """Test policy: MoEpic-like, experts cut 0.3/0.7 and the tops of layer 0's first three experts
    placed before the first request; demand copies only."""

    def parts(self, layer):
        return (0.3, 0.7)

    def warm_blocks(self, gpu):
        return [(0, e, 0) for e in range(3)]


_cached_tops = registered(("test_cached_tops", CachedTops))


@pytest.fixture(scope="module")
def three_tops(tmp_path_factory):
    """A 3-token prefill using experts 0, 1 and 2 at layer 0 (top-1), then decode tokens."""
    from conftest import write_trace
    requests = [[[[0], [1]], [[1], [2]], [[2], [0]], [[0], [1]]], [[[3], [3]], [[0], [1]]]]
    return load_trace(write_trace(tmp_path_factory.mktemp("tops") / "t", tiny_model(layers=2, experts=4, top_k=1),
                                  requests, prefill=[3, 0]))


def test_a_layer_whose_resident_parts_leave_no_room_evicts_a_later_one_and_copies_it_again(three_tops):
    """One expert of budget holds the three tops (3 x 0.3); the first expert's bottom (0.7) fits only
    if a later expert's top goes: it is evicted, and copied again when that expert's turn comes."""
    cfg = config(three_tops, "test_cached_tops", "1expert", SLOW_COPIES, warm_start=True)
    sim = execute(prepare(cfg))
    real = execute_real(prepare(cfg), real_machine(three_tops.model, host_sources=5))
    pd.testing.assert_frame_equal(sim.per_layer[DECISIONS], real.per_layer[DECISIONS])
    assert sim.metrics.requests == real.metrics.requests == 2
    top, bottom = 461, 1075  # of a 1536-byte expert
    # Layer 0: the prefill copies the three bottoms and one top again, the decode passes 3 experts whole.
    assert sim.per_layer["bytes_h2d"][0] == 3 * bottom + top + 3 * (top + bottom)


def test_a_run_that_stops_early_raises_instead_of_reporting_partial_metrics(three_tops, monkeypatch):
    monkeypatch.setattr(CopyScheduler, "_make_room", lambda self, job: False)  # the old scheduler: a demand always waits
    cfg = config(three_tops, "test_cached_tops", "1expert", SLOW_COPIES, warm_start=True)
    with pytest.raises(StallError, match=r"0 of 2 requests served .*GPU 0 waits to copy \(0, 0, 1\)"):
        execute(prepare(cfg))


def test_a_budget_too_small_for_one_part_is_refused_with_the_budget_needed(synthetic):
    hardware = unit_hardware().to_dict() | {"gpus": 2}
    cfg = config(synthetic, split_prefetcher((0.4, 0.6), 3, 2), "1expert", hardware, budget_scope="total", gpus=2)
    with pytest.raises(ConfigError, match=r"768 bytes .* layer 0's largest expert part \(922 bytes\).* at least 1,844"):
        execute(prepare(cfg))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.sampled_from([(0.4, 0.6), (0.6, 0.4), (0.3, 0.7), (0.2, 0.3, 0.5), (1.0,)]),
       chunks=st.integers(1, 4), guesses=st.integers(1, 3), order=st.sampled_from(["index", "availability"]),
       replace=st.booleans(), experts=st.integers(1, 2), copy_s=st.sampled_from([1e6, 1.0, 0.05]))
def test_any_split_chunking_and_tiny_budget_serves_every_request(synthetic, parts, chunks, guesses, order, replace,
                                                                experts, copy_s):
    cfg = config(synthetic, split_prefetcher(parts, chunks, guesses, order, replace), f"{experts}experts",
                 unit_hardware(copy_s=copy_s).to_dict())
    m = execute(prepare(cfg)).metrics
    assert m.requests == synthetic.num_requests and m.gpu_mem_high_water_bytes <= m.budget_bytes
