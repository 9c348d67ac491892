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
    expected = swiglu(y, w1, 16)
    expected[:2] += swiglu(y[:2], w2, 16)
    assert torch.allclose(out, expected, atol=1e-6)


def test_cpu_table_is_measured_and_loads_into_a_profile():
    model = tiny_model()
    table = cpu_table(model, [1, 8, 64], fmt="bf16", threads=1, repeats=3)
    assert [t for t, _ in table] == [1.0, 8.0, 64.0] and all(s > 0 for _, s in table)
    spec = CpuSpec.from_dict({"cores": 1, "mem_bandwidth_Bps": 1e9, "matmul_flops": 1e9,
                              "expert_time_s": {CpuSpec.key(model, "bf16"): table}}, "cpu")
    assert spec.measured(model) and spec.expert_time(model, 8) == pytest.approx(table[1][1])
