"""Batching, arrivals and several GPUs, on hand-built traces with hand-computed timelines."""
import pytest

from conftest import registered, tiny_model, unit_hardware
from policies import Policy, PrefetchPlan
from sim.api import simulate
from sim.config import SimConfig
from sim.errors import ConfigError

HIDDEN_BYTES = 16 * 2  # one token's hidden state in the tiny model


def hardware(gpus, nvlink_speedup=None, aggregate_links=None, **kwargs):
    hw = unit_hardware(**kwargs).to_dict()
    hw["num_gpus"] = gpus
    if nvlink_speedup:
        hw["nvlink"] = {"latency_s": 0.0, "bandwidth_Bps": 1536 * nvlink_speedup, "pairs": [[0, 1]]}
    if aggregate_links:
        hw["host_aggregate_Bps"] = 1536 * aggregate_links
    return hw


def run(trace, policy="lru", budget="2experts", hw=None, **kwargs):
    return simulate(SimConfig(policy=policy, budget=budget, hardware=hw or hardware(1), **kwargs), trace=trace)


def test_continuous_batching_needs_the_union_and_counts_throughput(make_trace):
    trace = make_trace(tiny_model(), [[[[0]], [[0]]], [[[1]], [[1]]]])
    result = run(trace, clients=2, max_batch=2)
    m = result.metrics
    # one pass for both: 0.01 + copy 0 (1 s) + compute 0 while 1 copies (until 2.01) + compute 1 = 2.11
    assert list(result.per_request["first_token_s"]) == pytest.approx([2.11, 2.11])
    assert m.tpot_mean_s == pytest.approx(0.21)  # both resident: 0.01 + 0.1 + 0.1
    assert m.steps == 2 and m.expert_uses == 4
    assert m.throughput_tokens_per_s == pytest.approx(4 / 2.32)
    one_at_a_time = run(trace).metrics
    assert one_at_a_time.steps == 4 and one_at_a_time.e2e_mean_s < m.e2e_mean_s * 1.5


def test_a_bound_that_reads_the_future_refuses_batches(make_trace):
    trace = make_trace(tiny_model(), [[[[0]]], [[[1]]]])
    with pytest.raises(ConfigError, match="max_batch=1"):
        run(trace, "belady", clients=2, max_batch=2)


class PrefetchAtStart(Policy):
    """Test policy: at request start, prefetch given blocks (optionally into a given GPU)."""

    def __init__(self, entries):
        self.entries = [tuple(e) for e in entries]

    def on_request_start(self, request):
        return PrefetchPlan([((e[0], e[1], 0), 1.0, *e[2:]) for e in self.entries]) if request.index == 0 else None


_prefetch_at_start = registered(("test_prefetch_at_start", PrefetchAtStart))


def two_layers_one_token(make_trace, layer0=0, layer1=1):
    return make_trace(tiny_model(layers=2), [[[[layer0], [layer1]]]])


def test_layers_split_over_gpus_pay_the_hidden_state_transfer(make_trace):
    trace = two_layers_one_token(make_trace)
    one = run(trace, "lru", "1expert", hardware(1)).metrics
    two = run(trace, "lru", "1expert", hardware(2)).metrics
    hop = 2 * HIDDEN_BYTES / 1536  # no NVLink: through the host, two PCIe copies
    assert two.ttft_mean_s == pytest.approx(one.ttft_mean_s + hop)
    assert two.gpus == 2 and two.budget_bytes == 1536  # the budget is per GPU
    assert run(trace, "lru", "2experts", hardware(2), budget_scope="total").metrics.budget_bytes == 1536


def test_the_report_says_a_budget_is_per_gpu_and_gives_the_total(make_trace):
    from rich.console import Console
    from sim.report import print_run
    console = Console(record=True, width=200)
    print_run(run(two_layers_one_token(make_trace), "lru", "1expert", hardware(2)), console)
    assert "budget 1.54 KB (1.0 experts) per GPU, 3.07 KB in all on 2 GPUs" in " ".join(console.export_text().split())


def test_host_copies_share_the_aggregate_limit(make_trace):
    trace = two_layers_one_token(make_trace)
    entries = [[0, 0], [1, 1]]  # both layers' experts prefetched at t=0, one on each GPU's link
    free = run(trace, "test_prefetch_at_start", "1expert", hardware(2), policy_params={"entries": entries}).metrics
    shared = run(trace, "test_prefetch_at_start", "1expert", hardware(2, aggregate_links=1),
                 policy_params={"entries": entries}).metrics
    hop = 2 * HIDDEN_BYTES / 1536
    # alone each copy takes 1 s; sharing one link's bandwidth, both take 2 s
    assert free.ttft_mean_s == pytest.approx(1.0 + 0.1 + hop + 0.01 + 0.1)
    assert shared.ttft_mean_s == pytest.approx(2.0 + 0.1 + hop + 0.01 + 0.1)


def test_a_block_staged_on_an_nvlink_peer_is_fetched_over_nvlink(make_trace):
    # Request 0 stages layer 0's expert 2 in GPU 1's cache; request 1 then needs it on GPU 0.
    trace = make_trace(tiny_model(layers=2), [[[[0], [1]]], [[[2], [1]]]])
    m = run(trace, "test_prefetch_at_start", "2experts", hardware(2, nvlink_speedup=4),
            policy_params={"entries": [[0, 2, 1]]}).metrics
    assert m.bytes_nvlink == 1536
    assert m.bytes_h2d == 3 * 1536  # 0 and 1 for request 0, and the staged copy itself
    second = run(trace, "test_prefetch_at_start", "2experts", hardware(2, nvlink_speedup=4),
                 policy_params={"entries": [[0, 2, 1]]}).per_request.iloc[1]
    nvlink_hop = HIDDEN_BYTES / (4 * 1536)  # one hop over NVLink
    # request 1: 0.01 + NVLink copy (0.25 s) + 0.1, hop, 0.01 + hit + 0.1
    assert second["e2e_s"] == pytest.approx(0.01 + 0.25 + 0.1 + nvlink_hop + 0.01 + 0.1)


def test_expert_parallel_layers_copy_and_compute_on_both_gpus_at_once(make_trace):
    trace = make_trace(tiny_model(experts=4, top_k=2), [[[[0, 1]]]])
    single = run(trace, "lru", "2experts", hardware(1)).metrics
    parallel = run(trace, "lru", "2experts", hardware(2), placement="experts").metrics
    assert single.ttft_mean_s == pytest.approx(0.01 + 1 + 1 + 0.1)
    hop = 2 * HIDDEN_BYTES / 1536  # dispatch to GPU 1 and combine back, each through the host
    assert parallel.ttft_mean_s == pytest.approx(0.01 + 1 + 0.1 + hop)


def test_topology_errors_are_one_line(make_trace):
    trace = two_layers_one_token(make_trace)
    with pytest.raises(ConfigError, match="at most one GPU per layer"):
        run(trace, hw=hardware(3))
    with pytest.raises(ConfigError, match="placement=rows: expected one of layers, experts"):
        run(trace, placement="rows")
