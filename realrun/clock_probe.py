"""python -m realrun.clock_probe [--out DIR]: how the executor's work slows down after waiting.

Decode layers of the largest model (as the executor runs them: the top-k experts, the next layer's
non-expert kernels, a host wait for the router's output; DecodeLoop) are timed warm (back to back),
and in the 8 layers after each way of waiting about 1 and 7 ms, with the GPU's SM clock read
beside them with --clocks (realrun.gpu_clocks; the sampling process slows the host down, so read
the launch times against the warm ones of the same run):
    idle         the host spins on its own clock, no copy and no CUDA call
    copy-spin    a host->GPU copy, its event polled in a busy loop (the executor's copy_wait=spin)
    copy-poll    the same, polled every 0.1 ms with the thread asleep between
    copy-sleep   the same, the thread asleep in cudaEventSynchronize (copy_wait=sleep)
    gpu-busy     no copy: the GPU computes (matrix products) as long, its event polled in a busy loop
Writes layers.csv (experiment, param, repeat, index, t_s, duration_s, and the host time launching
the layer's experts and non-expert kernels) and clocks.csv, both on time.perf_counter. Needs CUDA.
"""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import torch

from realrun.backend import Backend
from realrun.executor import RealOptions
from realrun.gpu_clocks import ClockLog
from realrun.kernels import NonExpertLayer, copies_beyond_cache, expert_fn
from realrun.memory import random_bf16
from traces import ModelSpec
from traces.atomic import atomic_write_csv
from traces.cli import ArgumentParser, run_cli
from traces.errors import UserError
from traces.model_spec import known_models, load_model_spec

MIB = 1 << 20


class DecodeLoop:
    """Decode layers run the executor's way, copy stalls and idle spins, on one device."""

    def __init__(self, backend: Backend, model: ModelSpec, kv_tokens: int, copy_bytes: int):
        self.backend, self.model = backend, model
        generator = torch.Generator(backend.device).manual_seed(5)
        per_layer = model.non_expert_params_per_layer * model.bytes_per_param
        self.layers = [NonExpertLayer(model, backend.device, kv_tokens, generator, i)
                       for i in range(copies_beyond_cache(per_layer))]
        self.expert = expert_fn(model)
        self.weights = [random_bf16(generator, model.bytes_per_expert // 2) for _ in range(2 * model.top_k)]
        self.x = torch.randn(1, model.hidden_size, generator=generator, device=backend.device).to(torch.bfloat16)
        self.src, self.dst = backend.pinned(copy_bytes), backend.empty(copy_bytes)
        self._next = 0
        self._product_s: float | None = None
        backend.synchronize()

    def run(self, n: int) -> list[tuple[float, float, float, float]]:
        """n layers, each as the executor runs a layer after its blocks are resident: launch its
        experts, launch the next layer's non-expert kernels, wait for their router output. Per
        layer: (end time, duration, host time launching the experts, host time launching the
        non-expert kernels); the GPU keeps up with the launches, so launching is what takes time."""
        backend, rows = self.backend, []
        h, y = self.x, self.x
        for _ in range(n):
            started = time.perf_counter()
            with backend.on_compute():
                for k in range(self.model.top_k):
                    h = h + self.expert(y, self.weights[(self._next + k) % len(self.weights)])
                experts_launched = time.perf_counter()
                h, y = self.layers[self._next % len(self.layers)].forward(self.x)
                router = backend.record_compute()
            launched = time.perf_counter()
            self._next += 1
            while not router.query():
                pass
            end = time.perf_counter()
            rows.append((end, end - started, experts_launched - started, launched - experts_launched))
        return rows

    def stall(self, nbytes: int, wait: str = "spin") -> float:
        """A host->GPU copy with the compute stream idle, waited for as the executor waits for a
        block: polling its event in a busy loop (wait="spin", RealOptions.copy_wait), asleep in
        cudaEventSynchronize ("sleep", likewise), or polling it every 0.1 ms, asleep between ("poll")."""
        started = time.perf_counter()
        with self.backend.on_copy():
            self.dst[:nbytes].copy_(self.src[:nbytes], non_blocking=True)
            landed = self.backend.record_copy(blocking=wait == "sleep")
        if wait == "sleep":
            landed.synchronize()
        while not landed.query():
            if wait == "poll":
                time.sleep(1e-4)
        return time.perf_counter() - started

    def busy(self, seconds: float) -> None:
        """Keep the GPU computing for about `seconds` (4096^3 matrix products), polling its event."""
        if self._product_s is None:
            a = torch.randn(4096, 4096, device=self.backend.device, dtype=torch.bfloat16)
            self._operands = a, a.t().contiguous()
            self.backend.synchronize()
            started = time.perf_counter()
            for _ in range(20):
                a @ self._operands[1]
            self.backend.synchronize()
            self._product_s = (time.perf_counter() - started) / 20
        with self.backend.on_compute():
            for _ in range(max(1, round(seconds / self._product_s))):
                self._operands[0] @ self._operands[1]
            done = self.backend.record_compute()
        while not done.query():
            pass

    @staticmethod
    def spin(seconds: float) -> None:
        """Keep the host busy and the GPU idle."""
        until = time.perf_counter() + seconds
        while time.perf_counter() < until:
            pass

    def heat(self, seconds: float) -> None:
        until = time.perf_counter() + seconds
        while time.perf_counter() < until:
            self.run(16)


WAIT_MIB = (48, 352)  # copies of about 1 and 7 ms on PCIe 5
AFTER_LAYERS = 8
REPEATS = 9


def probe(loop: DecodeLoop) -> pd.DataFrame:
    """The layers after each way of waiting, against warm layers (back to back)."""
    rows = []

    def record(experiment: str, param: str, repeat: int, layers: list[tuple[float, float, float, float]]) -> None:
        rows.extend((experiment, param, repeat, i, *layer) for i, layer in enumerate(layers))

    loop.heat(0.5)
    record("warm", "", 0, loop.run(128))
    for repeat in range(REPEATS):
        for mib in WAIT_MIB:
            loop.heat(0.05)
            loop.spin(loop.stall(mib * MIB, "sleep"))  # as long as the copy takes, without a copy or a CUDA call
            record("idle", f"{mib}", repeat, loop.run(AFTER_LAYERS))
            for wait in ("spin", "poll", "sleep"):
                loop.heat(0.05)
                copied = loop.stall(mib * MIB, wait)
                record(f"copy-{wait}", f"{mib}", repeat, loop.run(AFTER_LAYERS))
            loop.heat(0.05)
            loop.busy(copied)
            record("gpu-busy", f"{mib}", repeat, loop.run(AFTER_LAYERS))
    return pd.DataFrame(rows, columns=["experiment", "param", "repeat", "index", "t_s", "duration_s",
                                       "experts_launch_s", "non_expert_launch_s"])


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m realrun.clock_probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default=None, help="model profile (default: the one with the largest experts)")
    parser.add_argument("--kv-tokens", type=int, default=RealOptions.kv_tokens)
    parser.add_argument("--clocks", action="store_true", help="read the SM clock throughout (slows the host down)")
    parser.add_argument("--out", default="results/clock_probe")
    args = parser.parse_args(argv)

    def work() -> None:
        backend = Backend(args.device)
        if not backend.is_cuda:
            raise UserError("clock_probe measures a GPU's clocks: run it on a CUDA device")
        models = [load_model_spec(args.model)] if args.model else [load_model_spec(n) for n in known_models()]
        model = max(models, key=lambda m: m.bytes_per_expert)
        loop = DecodeLoop(backend, model, args.kv_tokens, max(WAIT_MIB) * MIB)
        with ClockLog(enabled=args.clocks) as clocks:
            layers = probe(loop)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_csv(out / "layers.csv", layers)
        atomic_write_csv(out / "clocks.csv", clocks.samples)
        warm = layers.query("experiment == 'warm'")[["experts_launch_s", "non_expert_launch_s"]].median()
        after = layers.query("experiment != 'warm'").groupby(["experiment", "param"], sort=False)[
            ["experts_launch_s", "non_expert_launch_s"]].median() / warm
        print(f"{model.name}: launching a layer's experts takes {warm.iloc[0] * 1e3:.3f} ms, its non-expert kernels "
              f"{warm.iloc[1] * 1e3:.3f} ms, back to back; in the {AFTER_LAYERS} layers after each wait (param: MiB "
              "copied, or idled as long), x that:")
        print(after.round(2).to_string())
        if clocks.unavailable:
            print(f"no clock log: {clocks.unavailable}")
        else:
            print(f"SM clock: {clocks.samples['sm_mhz'].min():.0f}..{clocks.samples['sm_mhz'].max():.0f} MHz, "
                  f"{len(clocks.samples)} changes")
        print(f"wrote {out}")
    run_cli(work)


if __name__ == "__main__":
    main()
