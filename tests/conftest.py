"""Shared builders for small, hand-made traces and profiles."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from policies.registry import register, scoped

from sim.profiles import HardwareProfile
from traces import ModelSpec, Provenance, TraceWriter, load_trace

# ../shared seen from /work/main (parents[2]) or from a worktree one level deeper (parents[3])
SHARED_DATA = next((p / "shared" / "data" for p in Path(__file__).resolve().parents[2:4] if (p / "shared" / "data").is_dir()),
                   Path(__file__).resolve().parents[2] / "shared" / "data")
SHARED_ROUTING = SHARED_DATA / "routing" / "mixtral-8x7b-instruct"
SHARED_GPT_OSS = SHARED_DATA / "routing" / "gpt-oss-20b"


def tiny_model(layers: int = 1, experts: int = 4, top_k: int = 1, name: str = "tiny") -> ModelSpec:
    # hidden 16 x width 16 x 3 matrices x 2 bytes = 1536 bytes per expert
    return ModelSpec(name=name, num_layers=layers, num_experts=experts, top_k=top_k, hidden_size=16,
                     expert_intermediate_size=16, num_attention_heads=2, num_key_value_heads=2)


def unit_hardware(copy_s: float = 1.0, expert_s: float = 0.1, non_expert_s: float = 0.01,
                  latency_s: float = 0.0, bytes_per_expert: int = 1536, cpu_s: float = 0.5,
                  cpu_spinning_s: float | None = None) -> HardwareProfile:
    """Round numbers: one expert copy takes copy_s + latency_s, compute is flat in tokens; on the
    host CPU an expert takes cpu_s (cpu_spinning_s beside a spinning host thread; None: no such
    table), and activations move in no time (a free down link, and 16 x 2 bytes a token over the
    host link: negligible beside copy_s)."""
    return HardwareProfile.from_dict({
        "name": "unit", "gpu_memory_bytes": 1e12,
        "host_link": {"latency_s": latency_s, "bandwidth_Bps": bytes_per_expert / copy_s},
        "mem_bandwidth_Bps": 1e12, "matmul_flops": 1e15, "launch_s": 0.0,
        "expert_time_s": {"h16_f16": [[1, expert_s]]},
        "non_expert_layer_time_s": {"tiny": [[1, non_expert_s]]},
        "cpu": {"cores": 1, "mem_bandwidth_Bps": 1e9, "matmul_flops": 1e9,
                "down_link": {"latency_s": 0.0, "bandwidth_Bps": 1e30},
                "expert_time_s": {"h16_f16/bf16": [[1, cpu_s]]},
                **({} if cpu_spinning_s is None else {"spinning_time_s": {"h16_f16/bf16": [[1, cpu_spinning_s]]}})},
    })


def probs_from_experts(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """One-hot-ish router probabilities whose top-k are exactly `experts` ([iters, layers, k])."""
    iters, layers, k = experts.shape
    probs = np.zeros((iters, layers, num_experts), dtype=np.float32)
    for j in range(k):
        np.put_along_axis(probs, experts[..., j:j + 1], (k - j) / (k * (k + 1) / 2), axis=-1)
    return probs


def trace_expert_uses(trace, requests) -> int:
    """Expert uses of the given requests counted from the trace itself, not by an engine: a prefill
    pass uses each layer's union of its tokens' experts (the counts where the trace kept only those),
    a decode step its routed experts. (A run's hit, late and miss rates are shares of what the engine
    counted, and add up to one by definition: this is what they can be checked against.)"""
    total = 0
    for r in requests:
        offset, prefill, decode = trace.rows(r)
        if prefill:
            tokens = trace.experts[offset:offset + prefill]
            total += sum(len(np.unique(tokens[:, layer])) for layer in range(tokens.shape[1]))
        else:
            total += int((trace.prefill_counts[r] > 0).sum())
        steps = trace.experts[offset + prefill:offset + prefill + decode]
        total += sum(len(np.unique(layer)) for step in steps for layer in step)
    return total


def write_trace(path: Path, model: ModelSpec, requests: list[list], prefill: list[int] | None = None,
                embeddings: list[np.ndarray] | None = None) -> Path:
    """requests[r] is a list of iterations; each iteration a list (per layer) of expert lists."""
    writer = TraceWriter(path, model, Provenance("test", "none", "hand-built", "tests"), overwrite=True)
    for r, iterations in enumerate(requests):
        experts = np.asarray(iterations, dtype=np.int64).reshape(len(iterations), model.num_layers, model.top_k)
        writer.add_request(request_id=f"r{r}", dataset="test", probs=probs_from_experts(experts, model.num_experts),
                           experts=experts, prefill_iters=(prefill or [0] * len(requests))[r],
                           embeddings=None if embeddings is None else {"e": embeddings[r]})
    return writer.close()


@pytest.fixture
def make_trace(tmp_path):
    counter = iter(range(10**6))

    def make(model: ModelSpec, requests: list[list], **kwargs):
        return load_trace(write_trace(tmp_path / f"trace{next(counter)}", model, requests, **kwargs))

    return make


SMALL_SWEEP = ["+policy=lru,belady", "+budget=2GB,8GB", "policy.scope=per_layer,global", "max_requests=1"]


@pytest.fixture(scope="session")
def small_sweep(tmp_path_factory) -> Path:
    """A finished 8-run sweep (2 policies x 2 scopes x 2 budgets, one request each), one process."""
    root = tmp_path_factory.mktemp("small_sweep")
    done = subprocess.run([sys.executable, "-m", "sim", "-m", *SMALL_SWEEP, "progress=false", "hydra/launcher=basic",
                           f"hydra.sweep.dir={root / 'sweep'}"], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return root / "sweep"


def repo_env() -> dict[str, str]:
    """The environment for a subprocess that must run this checkout's code, whatever is installed."""
    import os

    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}


@pytest.fixture(autouse=True)
def _registry_restored():
    """A policy a test registers is forgotten after it: every test sees the shipped policies, plus
    those its module registers for its own tests (registered())."""
    with scoped():
        yield


def registered(*policies: tuple[str, type]):
    """A module's fixture that registers its test policies for its own tests only:
    `_policies = registered(("test_name", Class), ...)` at the module's top level."""
    @pytest.fixture(scope="module", autouse=True)
    def fixture():
        with scoped():
            for name, cls in policies:
                register(name)(cls)
            yield
    return fixture
