"""realrun on the CPU (no GPU in CI; on a GPU machine every device test also runs on CUDA): the
executor takes the simulator's decisions, keeps the budget, and its copy engine queues, chunks,
preempts and cancels like the simulator's link."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

torch = pytest.importorskip("torch")  # realrun runs on torch; the core install has none

from conftest import registered, tiny_model, trace_expert_uses, unit_hardware
from policies import DEMAND_PRIORITY, Policy, PrefetchPlan
from realrun.api import execute_real
from realrun.backend import Backend
from realrun.compare import StoredRuns, run_compare
from realrun.copy_engine import CopyEngine
from realrun.executor import Machine, RealOptions
from realrun.memory import HostExperts, SlotPool
from realrun.subset import first_layers
from sim.api import execute, prepare
from sim.config import SimConfig
from sim.metrics import Recorder
from sim.placement import PlacedCache

REPO = Path(__file__).resolve().parents[1]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DECISIONS = ["hits", "prefetch_hits", "late_prefetches", "misses", "bytes_h2d"]


@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    """Three layers of four experts, top-2; one request with a 3-token prefill, two decode-only ones."""
    from conftest import write_trace
    from traces import load_trace

    rng = np.random.default_rng(7)
    requests = [[[list(rng.choice(4, 2, replace=False)) for _ in range(3)] for _ in range(n)] for n in (9, 7, 6)]
    path = write_trace(tmp_path_factory.mktemp("t") / "trace", tiny_model(layers=3, experts=4, top_k=2), requests,
                       prefill=[3, 0, 0])
    return load_trace(path)


@pytest.fixture(scope="module", params=DEVICES)
def machine(routed, request):
    return Machine(routed.model, RealOptions(device=request.param, kv_tokens=8, host_sources=5))


def both(trace, machine, hardware=None, **cfg):
    config = SimConfig(trace=str(trace.path), hardware=hardware or unit_hardware().to_dict(), **cfg)
    return execute(prepare(config, trace)), execute_real(prepare(config, trace), machine)


@pytest.mark.parametrize("policy, params", [("lru", {}), ("lru", {"scope": "global"}), ("belady", {}),
                                            ("belady", {"scope": "per_layer"})])
@pytest.mark.parametrize("budget", ["1expert", "2experts", "3experts", "5experts", "8experts"])
def test_same_hits_and_misses_per_layer_as_the_simulator(routed, machine, policy, params, budget):
    sim, real = both(routed, machine, policy=policy, policy_params=params, budget=budget)
    pd.testing.assert_frame_equal(sim.per_layer[DECISIONS], real.per_layer[DECISIONS])
    assert real.metrics.evictions == sim.metrics.evictions
    assert real.metrics.gpu_mem_high_water_bytes <= real.metrics.budget_bytes
    assert real.metrics.steps == sim.metrics.steps and real.metrics.expert_uses == sim.metrics.expert_uses


def test_all_resident_and_warm_start_agree_too(routed, machine):
    for kwargs in ({"policy": "all_resident"}, {"policy": "lru", "budget": "4experts", "warm_start": True}):
        sim, real = both(routed, machine, **kwargs)
        pd.testing.assert_frame_equal(sim.per_layer[DECISIONS], real.per_layer[DECISIONS])


def test_same_metric_keys_and_tables_as_the_simulator(routed, machine):
    sim, real = both(routed, machine, policy="lru", budget="3experts")
    assert sim.metrics.to_dict().keys() == real.metrics.to_dict().keys()
    assert list(sim.per_request.columns) == list(real.per_request.columns)
    assert list(sim.per_layer.columns) == list(real.per_layer.columns)
    m = real.metrics
    assert m.ttft_mean_s > 0 and m.tpot_mean_s > 0 and m.hardware == f"real: {machine.device_name}"
    assert any("host experts" in note for note in m.policy_info["realrun"])


class ChunkedLookahead(Policy):
    """Test policy: prefetch the two most likely experts of the next layer, in 3 chunks, replacing
    the queue every other layer; experts split in two equal parts."""

    copy_chunks = 3
    compute_order = "availability"

    def parts(self, layer):
        return (0.5, 0.5)

    def on_layer_start(self, step, layer, probs, experts):
        if layer + 1 >= self.ctx.model.num_layers:
            return None
        likely = np.argsort(-probs[0])[:2]
        return PrefetchPlan([((layer + 1, int(e), p), 2.0 - i) for i, e in enumerate(likely) for p in (0, 1)],
                            replace=layer % 2 == 0)


class UnevenChunkedLookahead(ChunkedLookahead):
    """The same with MoEpic's default split: the cache fragments, and blocks slide half copied."""

    def parts(self, layer):
        return (0.4, 0.6)


_lookaheads = registered(("test_chunked_lookahead", ChunkedLookahead),
                         ("test_uneven_chunked_lookahead", UnevenChunkedLookahead))


@pytest.mark.parametrize("policy, budget", [("test_chunked_lookahead", "1expert"),
                                            ("test_chunked_lookahead", "3experts"),
                                            ("test_uneven_chunked_lookahead", "4experts")])
def test_prefetching_chunked_split_policy_keeps_the_budget_and_lands_the_right_bytes(routed, machine, policy, budget):
    config = SimConfig(trace=str(routed.path), policy=policy, budget=budget, hardware=unit_hardware().to_dict())
    run = prepare(config, routed)
    from realrun.executor import Executor
    executor = Executor(machine, routed, run.policy, run.model, run.hardware, run.budget_bytes, run.replay)
    executor.prepare(run.train)
    state = executor.run()
    cache, rec = state.caches[0], state.recorder
    assert cache.high_water_bytes <= cache.capacity_bytes
    assert cache.pool.allocated_bytes() == cache.used_bytes
    assert sum(rec.hits) + sum(rec.late) + sum(rec.misses) == sum(rec.uses)
    assert rec.prefetches_requested > 0 and rec.prefetch_bytes > 0
    assert (cache.pool.compactions > 0) == (policy == "test_uneven_chunked_lookahead")
    for block in cache.resident_blocks():  # every resident block holds exactly its host bytes
        assert torch.equal(cache.pool.view(block).cpu(), machine.host.block(block, executor._part_bytes[block[0]]))


class UnevenSplit(Policy):
    """Test policy: demand-only, experts cut unevenly, differently per layer (MoEpic-like sizes)."""

    def parts(self, layer):
        return ((0.3, 0.7), (0.6, 0.4), (0.8, 0.2))[layer % 3]


class WholeLayer(Policy):
    """Test policy: demand-only, each layer gathers all its experts before computing (DeepSpeed-like)."""

    loads_whole_layer = True


_splits = registered(("test_uneven_split", UnevenSplit), ("test_whole_layer", WholeLayer))


@pytest.mark.parametrize("policy", ["test_uneven_split", "test_whole_layer"])
@pytest.mark.parametrize("budget", ["1expert", "2experts", "5experts"])
def test_uneven_parts_and_whole_layer_gathers_decide_as_the_simulator(routed, machine, policy, budget):
    sim, real = both(routed, machine, policy=policy, budget=budget)
    pd.testing.assert_frame_equal(sim.per_layer[DECISIONS], real.per_layer[DECISIONS])
    assert real.metrics.gpu_mem_high_water_bytes <= real.metrics.budget_bytes


class CheckedPool(SlotPool):
    """A SlotPool that checks every placement: blocks never overlap or leave the buffer allocated at
    the start; it keeps the most bytes it held at once."""

    def __init__(self, *args):
        super().__init__(*args)
        self.address = self.buffer.data_ptr()
        self.high_water_bytes = 0

    def place(self, block, nbytes):
        moves = super().place(block, nbytes)
        spans = sorted((offset, offset + n) for offset, n in self._where.values())
        assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:])) and spans[-1][1] <= self.arena_bytes
        assert self.buffer.data_ptr() == self.address
        self.high_water_bytes = max(self.high_water_bytes, self.allocated_bytes())
        return moves


@pytest.fixture
def checked_pools(monkeypatch):
    """The executor's pools are CheckedPools; the list of those it made."""
    pools = []

    def make(*args):
        pools.append(CheckedPool(*args))
        return pools[-1]
    monkeypatch.setattr("realrun.executor.SlotPool", make)
    return pools


# Copies that outlast all compute: a simulated copy then lands only while a layer waits for it, as
# on the CPU backend (its copies land when the executor next polls, which it does while it waits),
# so even a prefetching policy decides alike in both engines.
SLOW_COPIES = unit_hardware(copy_s=1e6).to_dict()


@pytest.mark.parametrize("budget, slides", [("4experts", True), ("5experts", True), ("8experts", False)])
def test_moepic_unequal_segments_decide_as_the_simulator_within_the_budget(routed, machine, checked_pools, budget,
                                                                           slides):
    sim, real = both(routed, machine, hardware=SLOW_COPIES, policy="moepic", budget=budget)
    pd.testing.assert_frame_equal(sim.per_layer[DECISIONS], real.per_layer[DECISIONS])  # hits, misses, bytes
    m = real.metrics
    assert m.evictions == sim.metrics.evictions and m.gpu_mem_high_water_bytes <= m.budget_bytes
    assert len(checked_pools) == 1 and checked_pools[0].high_water_bytes <= m.budget_bytes
    assert any("fragmented the cache" in note for note in m.policy_info["realrun"]) == slides
    # The simulator places the blocks as the pool does, so it slides the same bytes (and charges them).
    assert sim.metrics.policy_info.get("cache_compactions", 0) == checked_pools[0].compactions
    assert sim.metrics.policy_info.get("slid_bytes", 0) == checked_pools[0].moved_bytes


@pytest.mark.parametrize("budget, slides", [("4experts", True), ("8experts", False)])
def test_simulated_slides_take_device_memory_time_and_hold_up_expert_compute(routed, budget, slides):
    def makespan(mem_bandwidth_Bps: float) -> float:
        hardware = {**SLOW_COPIES, "mem_bandwidth_Bps": mem_bandwidth_Bps}
        return execute(prepare(SimConfig(trace=str(routed.path), hardware=hardware, policy="moepic", budget=budget),
                               routed)).metrics.makespan_s
    slid = execute(prepare(SimConfig(trace=str(routed.path), hardware=SLOW_COPIES, policy="moepic", budget=budget),
                           routed)).metrics.policy_info.get("slid_bytes", 0)
    assert (slid > 0) == slides
    # Each slid byte is read and written twice (down through a staging buffer) before the copy starts.
    assert makespan(4 * slid / 1e3) - makespan(1e30) == pytest.approx(1e3 if slides else 0.0, rel=0.2)


@pytest.mark.parametrize("policy", ["deepspeed", "moepic", "finemoe", "moe_infinity", "promoe", "mixtral_offload", "reuse"])
def test_published_policies_run_within_the_budget(routed, machine, policy):
    config = SimConfig(trace=str(routed.path), policy=policy, budget="5experts", hardware=unit_hardware().to_dict(),
                       train_fraction=0.34)
    prepared = prepare(config, routed)
    m = execute_real(prepared, machine).metrics
    assert m.gpu_mem_high_water_bytes <= m.budget_bytes
    assert m.expert_uses == trace_expert_uses(routed, prepared.replay)  # every use counted, once


class Recency(Policy):
    """Demand-only test policy evicting the lowest block id (the base class's order)."""


def engine_for(device, slots=2, chunks=4):
    backend = Backend(device)
    model = tiny_model(layers=1, experts=6)
    host = HostExperts(backend, model, sources=0)
    policy = Recency()
    policy.copy_chunks = chunks
    cache = PlacedCache(slots * model.bytes_per_expert, lambda b: model.bytes_per_expert, None)
    cache.pool = SlotPool(backend, cache.capacity_bytes, {model.bytes_per_expert})
    engine = CopyEngine(0, backend, [cache], policy, Recorder(1), host, lambda layer: [model.bytes_per_expert])
    return engine, engine.scheduler, cache, host, model


def drain(engine):
    while engine.busy:
        engine.poll()


def land_one(engine):
    while not engine.poll():
        pass


@pytest.mark.parametrize("device", DEVICES)
def test_copy_engine_chunks_preempts_between_chunks_and_cancels_a_started_prefetch(device):
    engine, scheduler, cache, host, model = engine_for(device)
    prefetch, demand = (0, 1, 0), (0, 2, 0)
    scheduler.fetch(prefetch, 1.0)  # starts its first chunk at once: memory reserved
    assert cache.is_in_flight(prefetch) and scheduler.current.block == prefetch
    scheduler.fetch(demand, DEMAND_PRIORITY)
    land_one(engine)  # chunk 1 of 4 of the prefetch lands; the demand preempts the rest
    assert scheduler.current.block == demand and prefetch in scheduler.queue
    scheduler.cancel_prefetches()  # the partly copied prefetch is dropped and its memory released
    assert not cache.holds(prefetch) and cache.wasted_prefetch_bytes == model.bytes_per_expert // 4
    drain(engine)
    assert cache.is_resident(demand)
    assert torch.equal(cache.pool.view(demand).cpu(), host.block(demand, [model.bytes_per_expert]))
    rec = scheduler.recorder
    assert rec.prefetches_cancelled == 1 and rec.demand_bytes == model.bytes_per_expert
    assert rec.prefetch_bytes == model.bytes_per_expert / 4
    assert cache.pool.allocated_bytes() == cache.used_bytes == model.bytes_per_expert


@pytest.mark.parametrize("device", DEVICES)
def test_copy_engine_drops_a_prefetch_without_room_and_a_demand_waits_for_an_unpin(device):
    engine, scheduler, cache, host, model = engine_for(device, slots=1, chunks=1)
    scheduler.fetch((0, 0, 0), DEMAND_PRIORITY)
    drain(engine)
    cache.pin((0, 0, 0))
    scheduler.fetch((0, 1, 0), 1.0)  # no evictable memory: dropped
    assert scheduler.recorder.prefetches_dropped == 1 and scheduler.current is None
    scheduler.fetch((0, 2, 0), DEMAND_PRIORITY)  # waits, blocked
    assert scheduler.blocked and scheduler.current is None
    cache.unpin((0, 0, 0))
    scheduler.kick()
    drain(engine)
    assert cache.is_resident((0, 2, 0)) and not cache.holds((0, 0, 0))
    assert torch.equal(cache.pool.view((0, 2, 0)).cpu(), host.expert(0, 2))


@pytest.mark.parametrize("device", DEVICES)
def test_slot_pool_reuses_freed_slots_and_slides_the_fewest_bytes_to_join_gaps(device):
    backend = Backend(device)
    pool = SlotPool(backend, 3 * 1024, {1024})
    for e in range(3):
        pool.place((0, e, 0), 1024)
    pool.free((0, 1, 0))
    pool.place((0, 3, 0), 1024)  # the freed slot is reused: equal blocks never fragment
    assert pool.allocated_bytes() == 3 * 1024 and pool.compactions == 0

    pool = SlotPool(backend, 5 * 1024, {1024, 2048})  # 5 KB, plus 256 B of padding per block: 6.5 KB
    a, b, c, d, e = [(0, i, 0) for i in range(5)]
    for block, nbytes in ((a, 1024), (b, 2048), (c, 1024), (d, 1024)):
        pool.place(block, nbytes)
    pattern = torch.arange(1024, dtype=torch.int32).to(torch.uint8).to(backend.device)
    pool.view(d).copy_(pattern)
    backend.synchronize()
    pool.free(a)
    pool.free(c)  # free: 1 KB, 1 KB and the 1.5 KB tail, around b (2 KB) and d (1 KB)
    pool.place(e, 2048)  # d slides down next to b, not both to the start
    backend.synchronize()
    assert pool.compactions == 1 and pool.moved_bytes == 1024 and pool.allocated_bytes() == 5 * 1024
    torch.testing.assert_close(pool.view(d), pattern)


@pytest.mark.parametrize("device", DEVICES)
def test_slot_pool_places_whatever_the_budget_admits_and_keeps_every_blocks_bytes(device):
    backend, capacity, sizes, rng = Backend(device), 8000, [700, 1000, 1300, 1900], np.random.default_rng(0)
    pool, held = CheckedPool(backend, capacity, set(sizes)), {}
    for step in range(300):
        nbytes = int(rng.choice(sizes))
        while sum(held.values()) + nbytes > capacity:  # evict at random, as a policy might
            victim = list(held)[rng.integers(len(held))]
            pool.free(victim)
            del held[victim]
        block = (0, step, 0)
        pool.place(block, nbytes)
        pool.view(block).fill_(step % 251)
        held[block] = nbytes
        backend.synchronize()
        assert all(bool((pool.view(b) == b[1] % 251).all()) for b in held)
    assert pool.compactions > 0 and pool.high_water_bytes <= capacity


def test_shared_host_buffers_are_said_and_layer_subset_keeps_routing(routed, tmp_path):
    host = HostExperts(Backend("cpu"), routed.model, sources=5)
    assert len(host.buffers) == 5 and "shared" in host.describe()
    assert host.pinned_bytes == 5 * routed.model.bytes_per_expert
    cut = first_layers(routed, 2, tmp_path / "cut")
    assert cut.model.num_layers == 2 and "first 2 of 3 layers" in cut.source.notes
    np.testing.assert_array_equal(np.asarray(cut.experts), np.asarray(routed.experts)[:, :2])
    np.testing.assert_array_equal(np.asarray(cut.prefill_counts), np.asarray(routed.prefill_counts)[:, :2])


def test_two_devices_split_the_layers_each_with_its_own_budget_as_in_the_simulator(routed):
    machine = Machine(routed.model, RealOptions(device="cpu", gpus=2, kv_tokens=8))
    assert machine.topology.layer_gpu == (0, 0, 1)
    for budget in ("1expert", "2experts", "3experts"):
        sim, real = both(routed, machine, policy="lru", budget=budget, gpus=2)
        pd.testing.assert_frame_equal(sim.per_layer[DECISIONS], real.per_layer[DECISIONS])
        assert real.metrics.gpus == 2 and real.metrics.gpu_mem_high_water_bytes <= real.metrics.budget_bytes


@pytest.mark.parametrize("clients, max_batch", [(2, 2), (3, 2)])
def test_closed_loop_batching_serves_and_decides_as_the_simulator(routed, machine, clients, max_batch):
    sim, real = both(routed, machine, policy="lru", budget="3experts", clients=clients, max_batch=max_batch)
    pd.testing.assert_frame_equal(sim.per_layer[DECISIONS], real.per_layer[DECISIONS])
    assert real.metrics.steps == sim.metrics.steps < 20  # decode passes were shared
    assert list(real.per_request["request_id"]) == list(sim.per_request["request_id"])


def test_compare_writes_the_table_and_rejoins_stored_measurements(routed, machine, tmp_path):
    profile = tmp_path / "unit.yaml"
    profile.write_text(yaml.safe_dump(unit_hardware().to_dict()))
    table = run_compare(routed, ["lru", "belady", "all_resident"], ["2experts", "5experts"], str(profile), machine,
                        tmp_path / "out")
    assert len(table) == 5  # all_resident once
    assert (table["hit_rate_diff_pts"] == 0).all() and (table["bytes_h2d_rel_err"] == 0).all()
    runs = pd.read_csv(tmp_path / "out" / "runs.csv")
    assert sorted(runs["engine"].unique()) == ["real", "sim"] and len(runs) == 10
    tokens = pd.read_csv(tmp_path / "out" / "tokens.csv")
    assert len(tokens) == 2 * 5 * (20 - 3)  # every TPOT sample of both engines (3 first tokens are TTFT)
    text = (tmp_path / "out" / "compare.md").read_text()
    assert "| lru | 2 experts" in text and "targets" in text
    again = run_compare(routed, ["lru", "belady", "all_resident"], ["2experts", "5experts"], str(profile), None,
                        tmp_path / "again", stored=StoredRuns(tmp_path / "out"))
    pd.testing.assert_frame_equal(table, again)


def test_cli_mirrors_the_simulators(routed, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "realrun", "+policy=lru", "+budget=2experts", f"trace={routed.path}",
                           "realrun.device=cpu", "realrun.layers=2", "realrun.kv_tokens=8", "progress=false",
                           f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["hardware"] == "real: cpu" and metrics["steps"] == 20
    assert "only the first 2 of 3 layers ran" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "realrun", "+policy=nope"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env=env)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "unknown policy" in bad.stderr


@pytest.mark.parametrize("device", DEVICES)
def test_live_transformers_model_decides_as_the_simulator_replaying_its_routing(tmp_path, device):
    from realrun.live import run_live

    spec = tiny_model(layers=2, experts=4, top_k=2)
    real, sim = run_live(spec, "lru", "3experts", requests=2, prompt_tokens=5, output_tokens=6,
                         hardware=unit_hardware().to_dict(), options=RealOptions(device=device), out=tmp_path)
    assert real.metrics.steps == sim.metrics.steps == 2 * 6  # a prefill pass and five decode passes each
    pd.testing.assert_frame_equal(sim.per_layer[DECISIONS], real.per_layer[DECISIONS])
    assert real.metrics.expert_uses > 2 * 6 * 2  # prefill passes need the union of their tokens' experts
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "trace" / "meta.json").is_file()
    assert "Live Mixtral run" in (tmp_path / "compare.md").read_text()


def test_fit_after_wait_recovers_the_model_it_fits_and_ignores_a_flat_response():
    from realrun.calibrate import fit_after_wait
    from sim.profiles import AfterWaitSpec

    truth, warm = AfterWaitSpec(2.4, 0.0008, 0.003), (0.0002, 0.0004)  # experts, non-expert groups

    def after(wait):  # the launch groups' factors that the model predicts after a wait
        warmth, factors = 1.0, []
        for i in range(16):
            wall, warmth = truth.step(warmth, wait if i == 0 else 0.0, warm[i % 2])
            factors.append(wall / warm[i % 2])
        return {"wait_s": wait, "factors": factors}
    response = {"warm_experts_s": warm[0], "warm_non_expert_s": warm[1],
                "after_copy_wait": [after(w) for w in (0.0002, 0.0007, 0.0013, 0.0036, 0.0073, 0.015)],
                "after_1s_idle": after(1.0)}
    spec = fit_after_wait(response)
    assert spec.cold_factor == pytest.approx(truth.cold_factor, rel=0.05)
    assert spec.warm_up_s == pytest.approx(truth.warm_up_s, rel=0.25)
    assert spec.cool_down_s == pytest.approx(truth.cool_down_s, rel=0.25)
    flat = {**response, "after_copy_wait": [], "after_1s_idle": {"wait_s": 1.0, "factors": [1.01] * 16}}
    assert fit_after_wait(flat) is None and fit_after_wait({}) is None


@pytest.mark.parametrize("policy, params", [("n_cpu_moe", {"layers": 1}), ("ktransformers", {"strategy": "uniform"})])
@pytest.mark.parametrize("budget", ["2experts", "5experts"])
def test_cpu_experts_run_for_real_and_decide_as_the_simulator(routed, machine, policy, params, budget):
    sim, real = both(routed, machine, policy=policy, policy_params=params, budget=budget)
    pd.testing.assert_frame_equal(sim.per_layer[DECISIONS], real.per_layer[DECISIONS])
    assert real.metrics.cpu_expert_uses == sim.metrics.cpu_expert_uses > 0
    assert real.metrics.bytes_activations == sim.metrics.bytes_activations
    assert real.metrics.gpu_mem_high_water_bytes <= real.metrics.budget_bytes
