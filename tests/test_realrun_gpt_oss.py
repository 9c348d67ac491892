"""gpt-oss in realrun, on the CPU: its experts' bytes and clamped, biased SwiGLU, its attention
(query heads of 64 wider than hidden / heads, alternating sliding window, sinks), and a run at
tiny shapes that decides as the simulator does."""
import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import unit_hardware, write_trace
from realrun.api import execute_real
from realrun.executor import Machine, RealOptions
from realrun.kernels import (GPT_OSS, NonExpertLayer, architecture, biased_clamped_swiglu, expert_fn,
                             realrun_model)
from sim.api import execute, prepare
from sim.config import SimConfig
from traces import ModelSpec, load_trace
from traces.errors import UserError
from traces.model_spec import load_model_spec

TINY = ModelSpec(name="gpt-oss-tiny", num_layers=2, num_experts=4, top_k=2, hidden_size=16,
                 expert_intermediate_size=12, num_attention_heads=8, num_key_value_heads=2, head_dim=4,
                 expert_bias=True)


def test_gpt_oss_runs_its_experts_at_bf16_size_768_of_them_38_gb():
    shipped = load_model_spec("gpt-oss-20b")
    assert shipped.expert_format == "mxfp4"
    model = realrun_model(shipped)
    assert model.expert_format == "bf16"
    assert model.bytes_per_expert == 49_783_680  # 2 x (3 x 2880 x 2880 + 2 x 2880 + 2880 + 2880 biases)
    assert model.num_layers * model.num_experts == 768
    assert model.total_expert_bytes == 38_233_866_240
    assert architecture(model) is GPT_OSS and architecture(load_model_spec("mixtral-8x7b")).sliding_window == 0


def reference_expert(x, gate_up, gate_up_bias, down, down_bias, alpha=1.702, limit=7.0):
    """openai/gpt-oss's reference MLP (gate and up interleaved), in float64."""
    h = x @ gate_up.T + gate_up_bias
    gate, up = h[..., ::2].clamp(max=limit), h[..., 1::2].clamp(-limit, limit)
    return ((up + 1) * gate * torch.sigmoid(alpha * gate)) @ down.T + down_bias


def test_expert_reads_weights_and_biases_from_the_slot_in_order_and_clamps():
    hidden, width = 16, 12
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(2 * width, hidden, generator=g), torch.randn(2 * width, generator=g),
             torch.randn(hidden, width, generator=g), torch.randn(hidden, generator=g)]
    flat = torch.cat([p.flatten() for p in parts]).double()
    assert flat.numel() * 2 == TINY.bytes_per_expert
    x = 3 * torch.randn(5, hidden, generator=g, dtype=torch.float64)  # large enough to reach the clamps
    got = expert_fn(TINY)(x, flat)
    want = reference_expert(x, *(p.double() for p in parts))
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-10)
    unclamped = biased_clamped_swiglu(x, flat, hidden, alpha=1.702, limit=1e9)
    assert not torch.allclose(unclamped, want)  # the clamp acts on these inputs


def test_a_part_of_an_expert_is_an_expert_of_its_width():
    """MoEpic's segments: a slot holding part of an expert's rows computes as an expert that narrow."""
    hidden, width = TINY.hidden_size, 4
    g = torch.Generator().manual_seed(1)
    parts = [torch.randn(2 * width, hidden, generator=g), torch.randn(2 * width, generator=g),
             torch.randn(hidden, width, generator=g), torch.randn(hidden, generator=g)]
    flat = torch.cat([p.flatten() for p in parts] + [torch.zeros(7)]).double()  # a part's slot rounds up
    x = torch.randn(3, hidden, generator=g, dtype=torch.float64)
    assert torch.allclose(expert_fn(TINY)(x, flat), reference_expert(x, *(p.double() for p in parts)),
                          rtol=1e-10, atol=1e-10)


def test_attention_heads_sliding_window_and_sinks():
    g = torch.Generator().manual_seed(1)
    sliding, full = (NonExpertLayer(TINY, torch.device("cpu"), 200, g, layer) for layer in (0, 1))
    assert sliding.qkv.shape == (8 * 4 + 2 * 2 * 4, 16) and sliding.out.shape == (16, 32)
    assert sliding.keys.shape[2] == 128 and full.keys.shape[2] == 200  # even layers: the last 128 tokens
    q = torch.randn(1, 8, 3, 4, generator=g, dtype=torch.float64)
    full.keys, full.values = full.keys.double(), full.values.double()
    keys, values = (t[0].repeat_interleave(4, dim=0) for t in (full.keys, full.values))  # head i: KV head i // 4
    scores = q[0] @ keys.transpose(1, 2) / 2.0
    with_sink = torch.softmax(torch.cat([scores, full.sinks.double().view(8, 1, 1).expand(8, 3, 1)], -1), -1)
    want = with_sink[..., :-1] @ values
    assert torch.allclose(full.attention(q)[0], want, atol=1e-12)
    full.sinks = torch.full((8,), -torch.inf, dtype=torch.float64)  # no sink: plain softmax attention
    plain = torch.softmax(scores, -1) @ values
    assert torch.allclose(full.attention(q)[0], plain, atol=1e-12)
    x, y = sliding.forward(torch.randn(3, 16, generator=g).to(torch.bfloat16))
    assert x.shape == y.shape == (3, 16)


@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    rng = np.random.default_rng(3)
    requests = [[[list(rng.choice(4, 2, replace=False)) for _ in range(2)] for _ in range(n)] for n in (6, 5)]
    return load_trace(write_trace(tmp_path_factory.mktemp("t") / "trace", TINY, requests, prefill=[2, 0]))


def tiny_hardware() -> dict:
    profile = unit_hardware(bytes_per_expert=TINY.bytes_per_expert).to_dict()
    return {**profile, "expert_time_s": {TINY.expert_shape_key: [[1, 0.1]]},
            "non_expert_layer_time_s": {TINY.name: [[1, 0.01]]}}


@pytest.mark.parametrize("graphs", [False, True])
def test_a_tiny_gpt_oss_decides_as_the_simulator_on_the_cpu(routed, graphs):
    machine = Machine(TINY, RealOptions(device="cpu", kv_tokens=8, host_sources=3, graphs=graphs))
    cfg = SimConfig(trace=str(routed.path), policy="lru", budget="3experts", hardware=tiny_hardware())
    sim, real = execute(prepare(cfg, routed)), execute_real(prepare(cfg, routed), machine)
    decisions = ["hits", "misses", "bytes_h2d"]
    pd.testing.assert_frame_equal(sim.per_layer[decisions], real.per_layer[decisions])
    assert real.per_layer["misses"].sum() > 0
    assert real.metrics.bytes_h2d == real.per_layer["misses"].sum() * TINY.bytes_per_expert
    assert machine.graphs is None if not graphs else machine.graphs[0].replays > 0


def test_a_quantised_run_on_realrun_says_to_run_bf16(routed, tmp_path):
    model = dataclasses.replace(TINY, expert_format="mxfp4")
    trace = load_trace(write_trace(tmp_path / "q", model, [[[[0, 1], [2, 3]]] * 3]))
    cfg = SimConfig(trace=str(trace.path), policy="lru", budget="3experts", hardware=tiny_hardware())
    machine = Machine(model, RealOptions(device="cpu", kv_tokens=8, host_sources=3))
    with pytest.raises(UserError, match="run with expert_format=bf16"):
        execute_real(prepare(cfg, trace), machine)
    done = execute_real(prepare(dataclasses.replace(cfg, expert_format="bf16"), trace), machine)
    assert done.metrics.bytes_h2d == done.per_layer["misses"].sum() * TINY.bytes_per_expert


def test_calibrate_times_gpt_oss_kernels_and_validates_on_its_first_requests(routed):
    from realrun.backend import Backend
    from realrun.calibrate import calibrate

    result = calibrate(Backend("cpu"), [TINY], copy_sizes=[1 << 20], tokens=[1, 2], trials=1, reps=1, copy_reps=2,
                       kv_tokens=8, policy_trace=routed, train_fraction=0.5, spread_limit=float("inf"),
                       validation_remeasures=0, decode_steps=10, max_requests=1, executor_host=True)
    profile = result.profile
    assert set(profile.non_expert_layer_time_s) == {TINY.name}
    assert TINY.expert_shape_key in profile.expert_time_s
    assert any(size == TINY.bytes_per_expert for size, _ in profile.to_dict()["host_link"]["copy_time_s"])
    checks = profile.extra["calibration"]["validation"]["checks"]
    assert [c["policy"] for c in checks] == ["all_resident", "lru", "oracle_prefetch"]
    # every policy's host time also timed on the executor (moepic's segments too), the replay's kept beside
    calibration = profile.extra["calibration"]
    assert set(calibration["policy_host_executor"]["policies"]) == set(profile.policy_host_s)
    assert set(calibration["policy_host_replay_s"]) == set(profile.policy_host_s)
    # validated on the request before the replayed ones; a term fitted there says by how much
    validation = calibration["validation"]
    assert validation["request"] == max(0, int(routed.num_requests * 0.5) - 1) and validation["tokens"] == 64
    assert set(validation["fitted"]) <= {"decode_layer", "after_wait"}
    assert {c["term"]: c["fitted"]["factor"] for c in validation["checks"] if "fitted" in c} == validation["fitted"]


def test_one_token_split_makes_the_measured_decode_layer_and_never_goes_negative():
    from realrun.calibrate import one_token_split

    # The H200's gpt-oss figures: kernels timed one by one 356 + 4 x 149 us, the layer in graphs 281 us.
    ne, ex = one_token_split(356e-6, 149e-6, 4, 281e-6)
    assert ne + 4 * ex == pytest.approx(281e-6) and ne > 0 and ex > 0
    assert ne / ex == pytest.approx(356 / 149)
    # A layer slower than its kernels: the host's time goes on the non-expert entry, experts unchanged.
    assert one_token_split(356e-6, 149e-6, 4, 1199e-6) == (pytest.approx(356e-6 + 1199e-6 - 952e-6), 149e-6)
