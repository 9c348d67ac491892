"""realrun's CPU experts: the FFN on the host CPU matches the GPU kernel's maths, and the CPU table
is measured for real (tiny shape)."""
import pytest

torch = pytest.importorskip("torch")

from conftest import tiny_model  # noqa: E402
from realrun.cpu_experts import CpuExperts, cpu_table  # noqa: E402
from realrun.kernels import swiglu  # noqa: E402
from sim.host_cpu import CpuSpec  # noqa: E402


def test_cpu_experts_sum_the_ffn_of_each_expert_over_its_tokens():
    model = tiny_model()
    cpu = CpuExperts(model, max_tokens=4, fmt="fp32", pin=False)
    gen = torch.Generator().manual_seed(1)
    w1, w2 = cpu.weights(gen), cpu.weights(gen)
    y = torch.randn(4, 16, generator=gen)
    out = cpu.run(y, [(w1, 4), (w2, 2)])
    expected = swiglu(y, w1.view(torch.float32), 16)  # an expert is its host block's bytes
    expected[:2] += swiglu(y[:2], w2.view(torch.float32), 16)
    assert torch.allclose(out, expected, atol=1e-6)


def test_cpu_table_is_measured_and_loads_into_a_profile():
    model = tiny_model()
    table = cpu_table(model, [1, 8, 64], fmt="bf16", threads=1, repeats=3)
    assert [t for t, _ in table] == [1.0, 8.0, 64.0] and all(s > 0 for _, s in table)
    spec = CpuSpec.from_dict({"cores": 1, "mem_bandwidth_Bps": 1e9, "matmul_flops": 1e9,
                              "expert_time_s": {CpuSpec.key(model, "bf16"): table}}, "cpu")
    assert spec.measured(model) and spec.expert_time(model, 8) == pytest.approx(table[1][1])


def test_gpt_oss_expert_is_the_clamped_biased_swiglu():
    from realrun.cpu_experts import gpt_oss_swiglu
    gen = torch.Generator().manual_seed(2)
    h, f = 8, 4
    x, w, b = torch.randn(3, h, generator=gen), torch.randn(3 * h * f, generator=gen), torch.randn(2 * f + h, generator=gen)
    gate_up, down = w[: 2 * f * h].view(2 * f, h), w[2 * f * h:].view(h, f)
    rows = x @ gate_up.t() + b[: 2 * f]
    expected = torch.zeros(3, h)
    for t in range(3):  # transformers' GptOssExperts, one token and one unit at a time
        for j in range(f):
            g, u = min(rows[t, 2 * j].item(), 7.0), max(-7.0, min(rows[t, 2 * j + 1].item(), 7.0))
            expected[t] += (u + 1) * g * torch.sigmoid(torch.tensor(1.702 * g)) * down[:, j]
        expected[t] += b[2 * f:]
    assert torch.allclose(gpt_oss_swiglu(x, w, b, h), expected, atol=1e-5)


def test_mxfp4_dequantises_codes_by_block_scale():
    from realrun.cpu_experts import dequantise_mxfp4
    codes = torch.tensor([0x21, 0xF7] + [0] * 14 + [0x9A] + [0] * 15, dtype=torch.uint8)  # two blocks of 32
    out = dequantise_mxfp4(codes, torch.tensor([127, 128], dtype=torch.uint8)).float()
    assert out[:4].tolist() == [0.5, 1.0, 6.0, -6.0]  # low nibble first, scale 2^0
    assert out[32:34].tolist() == [-2.0, -1.0] and out[34:].abs().sum() == 0 and out[4:32].abs().sum() == 0


@pytest.mark.parametrize("fmt, nbytes", [("bf16", 49_783_680), ("mxfp4", 13_236_480)])
def test_gpt_oss_cpu_experts_hold_the_stored_bytes_and_compute_in_every_format(fmt, nbytes):
    from traces.model_spec import load_model_spec
    model = load_model_spec("gpt-oss-20b")
    cpu = CpuExperts(model, max_tokens=2, fmt=fmt, threads=1, pin=False)
    block = cpu.weights(torch.Generator().manual_seed(0))
    assert block.numel() == nbytes == (model.bytes_per_expert if fmt == "mxfp4" else nbytes)
    out = cpu.run(torch.randn(2, model.hidden_size).to(torch.bfloat16), [(block, 2), (block, 1)])
    assert out.shape == (2, model.hidden_size) and torch.isfinite(out.float()).all()
    assert not torch.equal(out[0], out[1])


# Not lru_cpu: its background copies land when the clock says, which differs between the engines here.
@pytest.mark.parametrize("policy, params", [("fiddler", {}), ("n_cpu_moe", {"layers": 1})])
def test_cpu_experts_run_between_graph_replays_and_decide_as_the_simulator(make_trace, policy, params):
    """CUDA graphs for the GPU's part (here their CPU stand-in), CPU experts between: the same
    decisions as the simulator, CPU experts used, one-token layers replayed from graphs."""
    from conftest import unit_hardware
    from realrun.api import execute_real
    from realrun.executor import Machine, RealOptions
    from sim.api import execute, prepare
    from sim.config import SimConfig
    import numpy as np
    rng = np.random.default_rng(7)
    requests = [[[list(rng.choice(4, 2, replace=False)) for _ in range(3)] for _ in range(n)] for n in (9, 7, 6)]
    trace = make_trace(tiny_model(layers=3, experts=4, top_k=2), requests, prefill=[3, 0, 0])
    machine = Machine(trace.model, RealOptions(device="cpu", kv_tokens=8, graphs=True))
    hardware = unit_hardware(copy_s=1.0).to_dict()  # copies slow: the CPU beats them
    config = SimConfig(trace=str(trace.path), policy=policy, policy_params=params, budget="3experts", hardware=hardware)
    from realrun.executor import Timeline
    timeline = Timeline()
    sim, real = execute(prepare(config, trace)), execute_real(prepare(config, trace), machine, timeline=timeline)
    assert real.metrics.cpu_expert_uses == sim.metrics.cpu_expert_uses > 0
    assert real.metrics.hit_rate == sim.metrics.hit_rate
    assert machine.graphs[0].replays > 0
    cpu = timeline.frame().query("kind == 'cpu'")  # each layer's FFN on the worker: how many experts, when
    assert cpu["expert"].sum() == real.metrics.cpu_expert_uses and (cpu["host_end_s"] > cpu["host_s"]).all()
    # the blocked table, scaled to what this run's CPU experts took (the spinning one left as measured)
    from realrun.cpu_experts import rescaled_to_run
    key = "h16_f16/bf16"
    section = {**hardware["cpu"], "spinning_time_s": {key: [[1, 0.7]]},
               "expert_time_s": {key: [[1, 0.5], [4, 0.8]]}}
    scaled, note = rescaled_to_run(section, key, timeline.frame())
    run_s = float(((cpu["host_end_s"] - cpu["host_s"]) / cpu["expert"]).median())
    (t1, s1), (t4, s4) = scaled["expert_time_s"][key]
    assert (t1, t4) == (1, 4) and s1 == pytest.approx(run_s) and s4 / s1 == pytest.approx(0.8 / 0.5)
    assert scaled["spinning_time_s"] == section["spinning_time_s"] and "scaled by" in scaled["origin"] and key in note
    from traces.errors import UserError
    with pytest.raises(UserError, match="no CPU expert .*n_cpu_moe"):
        rescaled_to_run(section, key, timeline.frame().query("kind != 'cpu'"))


def test_cpu_layer_shortens_the_gil_switch_interval_while_open_and_restores_it():
    import sys
    from realrun.cpu_experts import SWITCH_INTERVAL_S, CpuLayer
    before = sys.getswitchinterval()
    layer = CpuLayer(tiny_model(), max_tokens=2, pin=False, threads=1)
    assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL_S)
    layer.close()
    assert sys.getswitchinterval() == pytest.approx(before)


def test_cpu_tables_as_run_are_measured_beside_a_blocked_and_a_spinning_thread_and_labelled(monkeypatch):
    import sys
    from concurrent.futures import Future
    from realrun import cpu_experts
    before, spun, blocked = sys.getswitchinterval(), [], []
    real_spin, real_result = cpu_experts.spin_until, Future.result
    monkeypatch.setattr(cpu_experts, "spin_until", lambda work: spun.append(1) or real_spin(work))
    monkeypatch.setattr(Future, "result", lambda work, *a: blocked.append(1) or real_result(work, *a))
    section = cpu_experts.cpu_section([tiny_model()], [1, 4], formats=("bf16",), threads=1, as_run=True)
    for name in ("expert_time_s", "spinning_time_s"):
        (table,) = section[name].values()
        assert [t for t, _ in table] == [1.0, 4.0] and all(s > 0 for _, s in table)
    # warm-ups (8 weights copies a shape) and every timed repeat, once each way (spin_until's own
    # result() after the spin is counted among the blocked ones)
    assert len(spun) == 2 * 8 + 2 * 21 and len(blocked) == 2 * (2 * 8 + 2 * 21)
    assert "blocked on the result" in section["origin"] and sys.getswitchinterval() == pytest.approx(before)
    with pytest.raises(ValueError, match="one of alone, blocked, spinning"):
        cpu_experts.cpu_table(tiny_model(), [1], host="busy")


def test_cpu_policies_host_times_are_measured_on_the_profile_with_a_cpu_section(make_trace):
    """calibrate skips the policies that compute on the CPU (no cpu section yet); cpu_experts,
    having just measured one, times their decisions as calibrate times the others'."""
    from conftest import unit_hardware
    from policies import available, policy_class
    from realrun.cpu_experts import cpu_policy_host_times
    from sim.profiles import HardwareProfile
    trace = make_trace(tiny_model(layers=2, experts=4, top_k=2), [[[[0, 1], [2, 3]], [[1, 2], [0, 3]]]] * 3,
                       prefill=[0, 0, 0])
    profile = {**unit_hardware().to_dict(), "policy_host_s": {"lru": {"layer_s": 1e-5, "step_s": 0.0}}}  # calibrate's
    times = cpu_policy_host_times(profile, str(trace.path), None, 0.0, None)
    assert set(times) == {p for p in available() if not p.startswith("test_") and policy_class(p).uses_cpu}
    assert all(t["layer_s"] >= 0 and t["step_s"] >= 0 for t in times.values())
    merged = HardwareProfile.from_dict({**profile, "policy_host_s": {**profile["policy_host_s"], **times}})
    assert set(times) | {"lru"} == set(merged.measured_policies())
