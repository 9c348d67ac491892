"""The host CPU and the disk tier: timing tables, hand-built cases where CPU compute must win and
must lose (exact timelines), and budget invariants over three tiers (GPU <- RAM <- SSD)."""
import pytest

from conftest import tiny_model, unit_hardware
from policies import make_policy
from sim.api import simulate
from sim.config import SimConfig
from sim.disk import DiskSpec, HostTier
from sim.errors import ConfigError
from sim.host_cpu import CpuSpec
from sim.profiles import load_hardware
from traces.model_spec import load_model_spec


def test_cpu_tables_interpolate_and_fall_back_to_a_labelled_roofline():
    cpu = load_hardware("h200-measured").cpu
    mixtral = load_model_spec("mixtral-8x7b")
    assert cpu.expert_time(mixtral, 1) == pytest.approx(9.7e-3)  # issue 23's measurement, bf16
    assert cpu.expert_time(mixtral, 64) == pytest.approx(12e-3)
    assert cpu.expert_time(mixtral, 32.5) == pytest.approx(9.7e-3 + 2.3e-3 * 31.5 / 63)
    assert cpu.expert_time(mixtral, 1, "fp32") == pytest.approx(7.8e-3)
    assert cpu.measured(mixtral) and not cpu.measured(mixtral, "int4")
    # roofline: int4 stored bytes over 112 GB/s at 1 token; FLOPs over 1.9 TFLOP/s at 512 tokens
    assert cpu.expert_time(mixtral, 1, "int4", stored_bytes=88_000_000) == pytest.approx(88e6 / 1.12e11)
    assert cpu.expert_time(mixtral, 512, "int4", stored_bytes=88_000_000) == \
        pytest.approx(2 * mixtral.params_per_expert * 512 / 1.9e12)


def test_bad_cpu_section_is_one_clear_error():
    with pytest.raises(ConfigError, match="SHAPE/FORMAT"):
        CpuSpec.from_dict({"cores": 4, "mem_bandwidth_Bps": 1e9, "matmul_flops": 1e9,
                           "expert_time_s": {"h16_f16": [[1, 0.1]]}}, "cpu")
    with pytest.raises(ConfigError, match="needs cores"):
        CpuSpec.from_dict({"cores": 4}, "cpu")


def one_layer_run(make_trace, cpu_s, policy="fiddler", budget="2experts", **kw):
    """1 layer, 4 experts, top-1; one request of 3 decode passes using experts 2, 3, 2. Fiddler with
    budget 2 and no training split places expert 0 and keeps 1 slot for copies: 2 and 3 miss."""
    model = tiny_model(layers=1, experts=4, top_k=1)
    trace = make_trace(model, [[[[2]], [[3]], [[2]]]])
    hw = unit_hardware(copy_s=1.0, expert_s=0.1, non_expert_s=0.01, cpu_s=cpu_s)
    cfg = SimConfig(trace=str(trace.path), policy=policy, budget=budget, hardware=hw.to_dict(), **kw)
    return simulate(cfg, trace=trace).metrics


def test_cpu_compute_wins_when_it_beats_the_copy(make_trace):
    m = one_layer_run(make_trace, cpu_s=0.5)  # 0.5 s on the CPU against 1 s copy + 0.1 s on the GPU
    assert m.cpu_expert_uses == 3 and m.bytes_h2d == 0
    # each pass: 0.01 s attention, hidden state down (free link), 0.5 s on the CPU, and the result
    # (16 x 2 bytes) up the host link at 1536 B/s
    assert m.makespan_s == pytest.approx(3 * (0.01 + 0.5 + 32 / 1536), abs=1e-9)
    assert m.bytes_activations == 3 * 2 * 32


def test_cpu_compute_loses_when_the_copy_is_faster(make_trace):
    m = one_layer_run(make_trace, cpu_s=2.0)
    assert m.cpu_expert_uses == 0 and m.bytes_h2d == 3 * 1536  # 2, then 3 (evicting 2), then 2 again
    assert m.makespan_s == pytest.approx(3 * (0.01 + 1.0 + 0.1), abs=1e-6)


def test_cpu_and_gpu_compute_in_parallel(make_trace):
    """top-2 with expert 0 resident (GPU, 0.1 s) and expert 2 on the CPU (0.5 s): the layer takes the longer."""
    model = tiny_model(layers=1, experts=4, top_k=2)
    trace = make_trace(model, [[[[0, 2]]]])
    hw = unit_hardware(cpu_s=0.5)
    m = simulate(SimConfig(trace=str(trace.path), policy="ktransformers", budget="1experts",
                           hardware=hw.to_dict()), trace=trace).metrics
    assert m.cpu_expert_uses == 1 and m.hit_rate == 0.5
    assert m.makespan_s == pytest.approx(0.01 + 0.5 + 32 / 1536, abs=1e-9)


def test_n_cpu_moe_fit_picks_the_fewest_cpu_layers_the_budget_allows(make_trace):
    model = tiny_model(layers=4, experts=4, top_k=1)
    trace = make_trace(model, [[[[0], [1], [2], [3]]] * 2])
    hw = unit_hardware(cpu_s=0.5).to_dict()
    m = simulate(SimConfig(trace=str(trace.path), policy="n_cpu_moe", budget="9experts", hardware=hw),
                 trace=trace).metrics
    assert m.policy_info["n_cpu_moe"] == 2  # 2 GPU layers x 4 experts fit 9 slots, 3 would not
    assert m.cpu_expert_uses == 4 and m.bytes_h2d == 0 and m.hit_rate == 0.5


def test_a_policy_using_the_cpu_needs_a_cpu_section(make_trace):
    model = tiny_model()
    trace = make_trace(model, [[[[0]]]])
    hw = unit_hardware().to_dict()
    del hw["cpu"]
    with pytest.raises(ConfigError, match="no cpu section"):
        simulate(SimConfig(trace=str(trace.path), policy="fiddler", budget="2experts", hardware=hw), trace=trace)


def test_host_tier_page_cache_starts_with_the_last_experts_and_queues_reads():
    tier = HostTier(DiskSpec(bandwidth_Bps=1000.0, latency_s=0.5, queue_depth=8, saturating_queue_depth=16),
                    ram_bytes=2000, expert_bytes=1000, num_layers=2, num_experts=2)
    assert list(tier.ram) == [(1, 0), (1, 1)]  # loading read all four; RAM keeps the last two
    assert tier.read(1, 1, now=0.0) == 0.0
    assert tier.read(0, 0, now=0.0) == pytest.approx(0.5 + 1000 / 500)  # half the queue depth: half speed
    assert tier.read(0, 1, now=1.0) == pytest.approx(2 * 2.5 - 1.0)  # waits behind the first read
    assert tier.read(0, 0, now=1.0) == pytest.approx(1.5)  # being read: waits for that read, no new one
    assert tier.disk_reads == 2 and tier.disk_bytes == 2000


def disk_run(make_trace, host_budget, policy="lru", **kw):
    model = tiny_model(layers=2, experts=4, top_k=1)
    trace = make_trace(model, [[[[e], [3 - e]] for e in (0, 1, 2, 3, 0, 1, 2, 3)]])
    hw = unit_hardware(copy_s=1.0, cpu_s=0.5).to_dict()
    hw["disk"] = {"bandwidth_Bps": 1536.0, "latency_s": 0.0, "queue_depth": 1, "saturating_queue_depth": 1}
    cfg = SimConfig(trace=str(trace.path), policy=policy, budget="2experts", hardware=hw, host_budget=host_budget, **kw)
    return simulate(cfg, trace=trace).metrics


@pytest.mark.parametrize("policy", ["lru", "lru_cpu", "fiddler"])
def test_three_tier_budget_invariants(make_trace, policy):
    whole = disk_run(make_trace, None, policy)
    tight = disk_run(make_trace, "4experts", policy)
    roomy = disk_run(make_trace, "8experts", policy)  # every expert fits in RAM: as no disk tier
    assert roomy.disk_reads == 0 and roomy.makespan_s == whole.makespan_s and roomy.bytes_h2d == whole.bytes_h2d
    assert tight.gpu_mem_high_water_bytes <= tight.budget_bytes
    assert tight.policy_info["engine"].startswith("simpy")  # the fast engine does not model the disk tier
    # every expert read from RAM was either there or read from the drive: reads from the drive
    # are whole experts, and a slower tier only delays
    assert tight.bytes_disk == tight.disk_reads * 1536 and tight.disk_reads > 0
    assert tight.makespan_s > whole.makespan_s
    if policy == "lru":  # demand only: what hits does not depend on timing
        assert tight.hit_rate == whole.hit_rate
    assert tight.ram_hits + tight.disk_reads >= tight.bytes_h2d / 1536


def test_host_budget_without_a_disk_is_refused(make_trace):
    model = tiny_model()
    trace = make_trace(model, [[[[0]]]])
    with pytest.raises(ConfigError, match="no disk section"):
        simulate(SimConfig(trace=str(trace.path), policy="lru", budget="2experts", host_budget="2experts",
                           hardware=unit_hardware().to_dict()), trace=trace)


def test_policies_config_knobs():
    with pytest.raises(Exception, match="strategy"):
        make_policy("ktransformers", strategy="nope")
    with pytest.raises(Exception, match="layers"):
        make_policy("n_cpu_moe", layers=-1)


def test_cpu_experts_beside_copy_waits_cost_the_spinning_table_and_alone_the_other(make_trace):
    """The executor's host thread spins on copy events while the layer's GPU side waits, and the
    CPU's FFN runs slower beside it (sim.host_cpu). lru_cpu, 1 layer, budget 2, top-2, copies of
    0.6 s: pass 1 uses 0 and 1 (both miss: CPU, copied meanwhile); pass 2 uses 1 (still in flight:
    the GPU waits for it) and 2 (misses: CPU, beside that wait)."""
    model = tiny_model(layers=1, experts=4, top_k=2)
    trace = make_trace(model, [[[[0, 1]], [[1, 2]]]])

    def run(spinning_s):
        hw = unit_hardware(copy_s=0.6, cpu_s=0.5, cpu_spinning_s=spinning_s)
        return simulate(SimConfig(trace=str(trace.path), policy="lru_cpu", budget="2experts", hardware=hw.to_dict()),
                        trace=trace).metrics
    alone, beside = run(None), run(0.8)
    assert alone.cpu_expert_uses == beside.cpu_expert_uses == 3
    up = 32 * 0.6 / 1536  # one token's expert output up the host link
    # pass 1: no expert on the GPU side, both CPU experts at the blocked table
    pass1 = 0.01 + 2 * 0.5 + up
    # pass 2: 1's copy lands at 1.21 and the GPU computes it by 1.31; the CPU, beside that wait, is longer
    assert alone.e2e_mean_s == pytest.approx(pass1 + 0.01 + 0.5 + up, abs=1e-9)
    assert beside.e2e_mean_s == pytest.approx(pass1 + 0.01 + 0.8 + up, abs=1e-9)
    assert (alone.cpu_busy_s, beside.cpu_busy_s) == pytest.approx((1.5, 1.8))
