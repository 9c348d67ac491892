"""Experts computed for real on the host CPU (torch on the CPU), for policies that answer
PrefetchPlan.cpu, and the measurement of the CPU's expert-FFN table (sim.host_cpu) that
realrun.calibrate writes into a hardware profile's cpu section.

The hidden state of the tokens a CPU expert serves is copied into a pinned host buffer, the FFN
runs on the host's threads over the expert's weights in host memory (the same SwiGLU layout as
realrun.kernels), and the result comes back through a pinned buffer with a non-blocking copy.
"""
from __future__ import annotations

import time

import torch

from realrun.kernels import expert_weights, swiglu
from traces import ModelSpec

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class CpuExperts:
    """One model's expert FFN on the host CPU, with pinned activation buffers."""

    def __init__(self, model: ModelSpec, max_tokens: int, fmt: str = "bf16", threads: int | None = None,
                 pin: bool | None = None):
        if fmt not in DTYPES:
            raise ValueError(f"CPU expert format '{fmt}': use one of {', '.join(DTYPES)}")
        if threads:
            torch.set_num_threads(threads)
        self.model, self.dtype = model, DTYPES[fmt]
        pin = torch.cuda.is_available() if pin is None else pin
        shape = (max_tokens, model.hidden_size)
        self.down = torch.empty(shape, dtype=self.dtype, pin_memory=pin)  # hidden state, GPU -> host
        self.up = torch.empty(shape, dtype=self.dtype, pin_memory=pin)  # results, host -> GPU

    def weights(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Random weights of one expert in this format (flat: gate/up [2f, h], then down [h, f])."""
        m = self.model
        n = 3 * m.hidden_size * m.expert_intermediate_size
        return (torch.randn(n, generator=generator) * 0.02).to(self.dtype)

    def run(self, y: torch.Tensor, experts: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
        """Sum over experts of FFN(y[:tokens]) for (weights, tokens) in `experts`, computed on the
        CPU; y lives on any device. Returns the result on y's device (rows: the most tokens)."""
        rows = max(t for _, t in experts)
        down = self.down[:rows]
        down.copy_(y[:rows])
        out = self.up[:rows]
        out.zero_()
        for weights, tokens in experts:
            out[:tokens] += swiglu(down[:tokens], weights, self.model.hidden_size)
        return out.to(y.device, non_blocking=True)


def cpu_table(model: ModelSpec, tokens: list[int], fmt: str = "bf16", threads: int | None = None,
              repeats: int = 5, weights_copies: int = 2) -> list[list[float]]:
    """[[tokens, seconds], ...]: one expert's FFN on this host's CPU, the median of `repeats`,
    cycling through `weights_copies` experts' weights so that the host's caches do not hold them
    (at real shapes each expert is far beyond the last-level cache). The key for the profile is
    sim.host_cpu.CpuSpec.key(model, fmt)."""
    cpu = CpuExperts(model, max(tokens), fmt, threads, pin=False)
    gen = torch.Generator().manual_seed(0)
    weights = [cpu.weights(gen) for _ in range(max(1, weights_copies))]
    y = torch.randn(max(tokens), model.hidden_size, generator=gen).to(cpu.dtype)
    table = []
    for t in tokens:
        cpu.run(y, [(weights[0], t)])  # warm up this shape
        samples = []
        for r in range(repeats):
            start = time.perf_counter()
            cpu.run(y, [(weights[r % len(weights)], t)])
            samples.append(time.perf_counter() - start)
        table.append([float(t), float(sorted(samples)[len(samples) // 2])])
    return table


def cpu_section(models: list[ModelSpec], tokens: list[int], formats: tuple[str, ...] = ("bf16", "fp32"),
                threads: int | None = None, **spec) -> dict:
    """A hardware profile's `cpu:` section with the expert tables measured on this host
    (spec: cores, mem_bandwidth_Bps, matmul_flops, as known for the host)."""
    import os
    cores = threads or os.cpu_count() or 1
    tables = {f"{m.expert_shape_key}/{fmt}": cpu_table(m, tokens, fmt, cores) for m in models for fmt in formats}
    return {"cores": cores, "mem_bandwidth_Bps": spec.get("mem_bandwidth_Bps", 1.0e11),
            "matmul_flops": spec.get("matmul_flops", 1.0e12), "expert_time_s": tables,
            "origin": f"realrun.calibrate cpu_table on this host, torch {torch.__version__}, {cores} threads"}


class CpuLayer:
    """A layer's CPU experts run on a host thread (torch's CPU kernels release the GIL) while the
    executor launches and waits for the GPU's experts; the result joins the hidden state after."""

    def __init__(self, model: ModelSpec, max_tokens: int, pin: bool):
        from concurrent.futures import ThreadPoolExecutor
        self.cpu = CpuExperts(model, max_tokens, pin=pin)
        self._pool = ThreadPoolExecutor(max_workers=1)

    def start(self, y: torch.Tensor, experts: list[tuple[torch.Tensor, int]]):
        """Copy the hidden state down now (y is ready: the router has run), compute in the background."""
        rows = max(t for _, t in experts)
        down = self.cpu.down[:rows]
        down.copy_(y[:rows])
        return self._pool.submit(self._compute, down, experts)

    def _compute(self, down: torch.Tensor, experts: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
        out = self.cpu.up[:down.shape[0]]
        out.zero_()
        for weights, tokens in experts:
            out[:tokens] += swiglu(down[:tokens], expert_weights(weights), self.cpu.model.hidden_size)
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True)
