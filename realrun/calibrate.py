"""python -m realrun.calibrate [--name NAME] [--device cuda] [--models mixtral-8x7b,...] [--out PATH]

Measures what the simulator's hardware profile holds, on this machine, the way realrun's executor
does the work, and writes conf/hardware/NAME.yaml (default NAME: the GPU's, e.g. h100-measured):
- host->GPU copies by size (pinned, through the executor's own copy engine, one at a time, landing
  noticed by polling): median seconds per copy. Fitted to latency + bytes / bandwidth on copies of
  8 MiB and more, and the whole curve kept (host_link.copy_time_s), since small copies pay more
  than the fit says. The bare DMA times (CUDA events) are kept beside it.
- expert FFN time by token count (1..512) for every expert shape of conf/model/*.yaml: launched
  back to back as the executor launches a layer's resident experts, so whichever of launching and
  running is slower is what counts.
- non-expert layer time by token count for every model: launched, then waited for (the executor
  waits for the router's output every layer), plus the executor's own per-layer host time (policy
  calls, the layer protocol), measured on an all-resident run of a few layers of the model.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml
from tqdm import tqdm

from conf import CONF_DIR
from policies.base import DEMAND_PRIORITY, Policy
from realrun.api import execute_real
from realrun.backend import Backend
from realrun.cache import SlottedCache
from realrun.copy_engine import CopyEngine
from realrun.executor import Machine, RealOptions
from realrun.kernels import NonExpertLayer, swiglu
from realrun.memory import HostExperts, SlotPool, random_bf16
from sim.api import prepare
from sim.config import SimConfig
from sim.metrics import Recorder
from sim.profiles import ClockSpec, HardwareProfile, LinkSpec, TimeTable
from sim.report import atomic_write_text
from traces import ModelSpec, load_trace
from traces.cli import run_cli
from traces.errors import UserError
from traces.model_spec import known_models, load_model_spec
from traces.synthetic import SyntheticParams, generate_synthetic

MIB = 1 << 20
COPY_SIZES = [MIB << i for i in range(10)]  # 1 MiB .. 512 MiB
TOKENS = [1 << i for i in range(10)]  # 1 .. 512
FIT_FROM_BYTES = 8 * MIB
OVERHEAD_LAYERS = (2, 6)  # layer counts of the all-resident runs that measure the per-layer host time
OVERHEAD_STEPS = 150  # decode steps of the larger run; the smaller runs as long


def _median_time(run: Callable[[], None], sync: Callable[[], None], trials: int, reps: int) -> float:
    """Median over trials of the wall time of `reps` back-to-back runs (synchronised), per run."""
    for _ in range(3):
        run()
    sync()
    times = []
    for _ in range(trials):
        started = time.perf_counter()
        for _ in range(reps):
            run()
        sync()
        times.append((time.perf_counter() - started) / reps)
    return statistics.median(times)


# --- copies ---
def copy_curve(backend: Backend, sizes: list[int], reps: int) -> tuple[list[list[float]], list[list[float]]]:
    """[[bytes, seconds per copy through the copy engine]], [[bytes, bare DMA seconds]] (medians)."""
    engine_points, dma_points = [], []
    for size in tqdm(sizes, desc="copies", unit="size", leave=False):
        n = max(12, min(reps, int(8 * 512 * MIB // size)))
        model = ModelSpec(name="copy", num_layers=1, num_experts=n + 2, top_k=1, hidden_size=1,
                          expert_intermediate_size=1, bytes_per_expert_override=size)
        host = HostExperts(backend, model, sources=2)
        cache = SlottedCache(2 * size, lambda block: size, None)
        cache.pool = SlotPool(backend, cache.capacity_bytes, size)
        engine = CopyEngine(0, backend, [cache], Policy(), Recorder(1), host, lambda layer: [size])
        landed = []
        for e in range(2):  # warm-up copies, one from each source buffer (first touches cost more)
            engine.fetch((0, n + e, 0), DEMAND_PRIORITY)
            while engine.current is not None:
                engine.poll()
        for e in range(n):
            engine.fetch((0, e, 0), DEMAND_PRIORITY)
        started = time.perf_counter()
        while engine.current is not None:
            if engine.poll():
                landed.append(time.perf_counter())
        gaps = np.diff([started] + landed)
        engine_points.append([size, float(np.median(gaps))])
        dma_points.append([size, _dma_time(backend, cache.pool.buffer[:size], host.buffers[1], n)])
        del engine, cache, host
    return engine_points, dma_points


def _dma_time(backend: Backend, dst: torch.Tensor, src: torch.Tensor, reps: int) -> float:
    if not backend.is_cuda:
        return _median_time(lambda: dst.copy_(src), backend.synchronize, 3, reps)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with backend.on_copy():
            start.record(backend.copy_stream)
            dst.copy_(src, non_blocking=True)
            end.record(backend.copy_stream)
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def fit_link(points: list[list[float]]) -> tuple[float, float]:
    """latency_s, bandwidth_Bps from a least-squares line through the copies of FIT_FROM_BYTES or more."""
    big = [(b, s) for b, s in points if b >= FIT_FROM_BYTES] or points
    if len(big) < 2:
        b, s = big[0]
        return 0.0, b / s
    x, y = np.array([b for b, _ in big]), np.array([s for _, s in big])
    slope, intercept = np.polyfit(x, y, 1)
    return max(0.0, float(intercept)), float(1.0 / slope)


# --- compute ---
def _rotating(count: int, make: Callable[[], object]) -> Callable[[], object]:
    """Cycle over `count` copies of some weights, so that timing does not read them from the L2 cache."""
    items = [make() for _ in range(count)]
    state = {"i": 0}

    def next_item():
        state["i"] = (state["i"] + 1) % count
        return items[state["i"]]
    return next_item


def _copies_beyond_cache(nbytes: int) -> int:
    return max(2, min(16, -(-256 * MIB // max(1, nbytes))))


def expert_times(backend: Backend, model: ModelSpec, tokens: list[int], trials: int, reps: int) -> list[list[float]]:
    h = model.hidden_size
    generator = torch.Generator(backend.device).manual_seed(1)
    weights = _rotating(_copies_beyond_cache(model.bytes_per_expert),
                        lambda: random_bf16(generator, model.bytes_per_expert // 2))
    backend.synchronize()
    points = []
    for t in tokens:
        x = torch.randn(t, h, generator=generator, device=backend.device).to(torch.bfloat16)
        out = torch.zeros_like(x)

        def run() -> None:
            with backend.on_compute():
                out.add_(swiglu(x, weights(), h))
        points.append([t, _median_time(run, backend.synchronize, trials, reps)])
    return points


def non_expert_times(backend: Backend, model: ModelSpec, tokens: list[int], kv_tokens: int, trials: int) -> list[list[float]]:
    generator = torch.Generator(backend.device).manual_seed(2)
    per_layer = model.non_expert_params_per_layer * model.bytes_per_param
    layer = _rotating(_copies_beyond_cache(per_layer), lambda: NonExpertLayer(model, backend.device, kv_tokens, generator))
    backend.synchronize()
    points = []
    for t in tokens:
        x = torch.randn(t, model.hidden_size, generator=generator, device=backend.device).to(torch.bfloat16)

        def run() -> None:
            with backend.on_compute():
                layer().forward(x)
                done = backend.record_compute()
            while not done.query():
                pass
        points.append([t, _median_time(run, backend.synchronize, trials, 1)])
    return points


def layer_host_overhead(model: ModelSpec, options: RealOptions, non_expert_1: float, expert_1: float,
                        work_dir: Path) -> tuple[float, float]:
    """The executor's time per decode layer beyond its kernels, and per token beyond its layers: the
    slope and intercept of an all-resident run's token time over its layer count (medians of the
    second half of each run, when the GPU's clocks are up)."""
    counts = sorted({min(c, model.num_layers) for c in OVERHEAD_LAYERS})
    if len(counts) < 2:
        return 0.0, 0.0
    tpot = []
    for layers in counts:
        small = dataclasses.replace(model, num_layers=layers)
        steps = OVERHEAD_STEPS * max(OVERHEAD_LAYERS) // layers
        params = SyntheticParams(requests=1, prompt_tokens=(0, 0), output_tokens=(steps, steps))
        trace = load_trace(generate_synthetic(work_dir / f"overhead-{model.name}-{layers}", small, params,
                                              overwrite=True))
        machine = Machine(small, dataclasses.replace(options, host_sources=2))
        result = execute_real(prepare(SimConfig(trace=str(trace.path), policy="all_resident"), trace), machine)
        tpot.append(statistics.median(result.token_latencies_s[len(result.token_latencies_s) // 2:]))
        del machine
    per_layer = (tpot[-1] - tpot[0]) / (counts[-1] - counts[0])
    return per_layer - non_expert_1 - model.top_k * expert_1, tpot[0] - counts[0] * per_layer


def copy_under_compute(backend: Backend, model: ModelSpec, reps: int = 5) -> tuple[float, float]:
    """(idle, busy): bare DMA seconds of one expert's copy with the GPU idle, and while expert FFNs
    run on the compute stream (do copies and compute contend for memory?)."""
    size = model.bytes_per_expert
    src = backend.pinned(size)
    dst = backend.empty(size)
    idle = _dma_time(backend, dst, src, reps)
    if not backend.is_cuda:
        return idle, idle
    generator = torch.Generator(backend.device).manual_seed(4)
    weights = random_bf16(generator, size // 2)
    x = torch.randn(64, model.hidden_size, generator=generator, device=backend.device).to(torch.bfloat16)
    one = _median_time(lambda: swiglu(x, weights, model.hidden_size), backend.synchronize, 3, 5)
    busy = []
    for _ in range(reps):
        with backend.on_compute():
            for _ in range(int(3 * idle / one) + 1):  # compute outlasting the copy
                swiglu(x, weights, model.hidden_size)
        busy.append(_dma_time(backend, dst, src, 1))
        backend.synchronize()
    return idle, statistics.median(busy)


# --- clocks ---
IDLE_GAPS_S = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.3)


def _spin(seconds: float) -> None:
    """Keep the host busy and the GPU idle (what a copy stall looks like to the GPU's compute)."""
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        pass


def clock_response(backend: Backend, model: ModelSpec, kv_tokens: int) -> dict:
    """How one decode layer of `model` (non-expert work and top-k experts) slows after the GPU has
    idled: its time when hot, the first layer after idle gaps, and the ramp back after a long idle
    (GPU times, CUDA events). Empty on the CPU."""
    if not backend.is_cuda:
        return {}
    generator = torch.Generator(backend.device).manual_seed(5)
    layer = NonExpertLayer(model, backend.device, kv_tokens, generator)
    weights = [random_bf16(generator, model.bytes_per_expert // 2) for _ in range(2 * model.top_k)]
    x = torch.randn(1, model.hidden_size, generator=generator, device=backend.device).to(torch.bfloat16)
    backend.synchronize()
    counter = iter(range(1 << 62))

    def launch() -> tuple[torch.cuda.Event, torch.cuda.Event]:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with backend.on_compute():
            start.record(backend.compute_stream)
            h, y = layer.forward(x)
            for _ in range(model.top_k):
                h = h + swiglu(y, weights[next(counter) % len(weights)], model.hidden_size)
            end.record(backend.compute_stream)
        return start, end

    def timed(n: int) -> list[float]:
        events = [launch() for _ in range(n)]
        backend.synchronize()
        return [a.elapsed_time(b) / 1e3 for a, b in events]

    def heat(seconds: float) -> None:
        until = time.perf_counter() + seconds
        while time.perf_counter() < until:
            timed(20)

    heat(0.5)
    hot = statistics.median(timed(100))
    gaps = []
    for gap in IDLE_GAPS_S:
        firsts = []
        for _ in range(3):
            heat(0.2)
            _spin(gap)
            firsts.append(timed(1)[0])
        gaps.append([gap, statistics.median(firsts) / hot])
    _spin(1.0)
    ramp = timed(1500)
    busy, points = 0.0, []
    for i in range(0, len(ramp), 10):
        points.append([busy, statistics.median(ramp[i: i + 10]) / hot])
        busy += sum(ramp[i: i + 10])
    return {"hot_layer_s": hot, "first_layer_after_idle": gaps, "ramp_after_1s_idle": points}


def fit_clock(response: dict) -> ClockSpec | None:
    """cold_factor, warm_up_s, cool_down_s of the linear heat model (sim.profiles.ClockSpec) that
    best fit the measured response; None when idling does not slow the GPU measurably."""
    if not response:
        return None
    ramp, gaps = response["ramp_after_1s_idle"], response["first_layer_after_idle"]
    cold = max(statistics.median([f for _, f in ramp[:3]]), max(f for _, f in gaps))
    if cold < 1.05:
        return None
    grid = np.geomspace(1e-4, 10.0, 400)

    def best(points: list[list[float]], model: Callable[[float, float], float]) -> float:
        errors = [sum((model(t, g) - f) ** 2 for t, f in points) for g in grid]
        return float(grid[int(np.argmin(errors))])
    cool = best(gaps, lambda gap, c: 1 + (cold - 1) * min(1.0, gap / c))
    warm = best(ramp, lambda t, w: 1 + (cold - 1) * max(0.0, 1 - t / w))
    return ClockSpec(cold, warm, cool)


# --- the profile ---
def profile_name(gpu: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-measured'."""
    match = re.search(r"\b([A-Z]{1,3}\d{2,4}[A-Z]?)\b", gpu)
    stem = match.group(1).lower() if match else re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    return f"{stem}-measured"


def device_ceilings(backend: Backend) -> tuple[float, float, float]:
    """(device memory bandwidth counting read + write, bf16 matmul FLOP/s, seconds per kernel launch)."""
    n = 1 << 28 if backend.is_cuda else 1 << 22
    a, b = backend.empty(n), backend.empty(n)
    a.random_(0, 255)
    with backend.on_compute():
        copy_s = _median_time(lambda: b.copy_(a), backend.synchronize, 5, 5)
    size = 8192 if backend.is_cuda else 256
    generator = torch.Generator(backend.device).manual_seed(3)
    m1 = torch.randn(size, size, generator=generator, device=backend.device).to(torch.bfloat16)
    m2 = torch.randn(size, size, generator=generator, device=backend.device).to(torch.bfloat16)
    with backend.on_compute():
        mm_s = _median_time(lambda: m1 @ m2, backend.synchronize, 5, 5)
    tiny = torch.ones(1, device=backend.device)
    with backend.on_compute():
        launch_s = _median_time(lambda: tiny.add_(1.0), backend.synchronize, 5, 200)
    return 2 * n / copy_s, 2 * size ** 3 / mm_s, launch_s


@dataclasses.dataclass
class Calibration:
    profile: HardwareProfile
    notes: list[str]


def calibrate(backend: Backend, models: list[ModelSpec], name: str | None = None, copy_sizes: list[int] | None = None,
              tokens: list[int] | None = None, kv_tokens: int = 512, trials: int = 7, reps: int = 20,
              copy_reps: int = 30) -> Calibration:
    tokens = tokens or TOKENS
    gpu = backend.name
    name = name or profile_name(gpu)
    sizes = sorted(set(copy_sizes or COPY_SIZES) | {m.bytes_per_expert for m in models})
    copy_points, dma_points = copy_curve(backend, sizes, copy_reps)
    latency, bandwidth = fit_link(copy_points)
    mem_bw, flops, launch = device_ceilings(backend)

    shapes = {m.expert_shape_key: m for m in models}
    expert_tables = {key: expert_times(backend, m, tokens, trials, reps)
                     for key, m in tqdm(shapes.items(), desc="expert FFNs", unit="shape", leave=False)}
    options = RealOptions(device=str(backend.device), kv_tokens=kv_tokens)
    non_expert_tables, overheads, token_overheads = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for m in tqdm(models, desc="non-expert layers", unit="model", leave=False):
            points = non_expert_times(backend, m, tokens, kv_tokens, trials)
            overhead, per_token = layer_host_overhead(m, options, TimeTable.from_points(points, "ne")(1),
                                                      TimeTable.from_points(expert_tables[m.expert_shape_key], "e")(1),
                                                      Path(tmp))
            overheads[m.name], token_overheads[m.name] = overhead, per_token
            non_expert_tables[m.name] = [[t, max(0.0, s + overhead)] for t, s in points]
            if backend.is_cuda:
                torch.cuda.empty_cache()

    largest = max(models, key=lambda m: m.bytes_per_expert)
    copy_idle, copy_busy = copy_under_compute(backend, largest)
    response = clock_response(backend, largest, kv_tokens)
    clock = fit_clock(response)
    fitted = LinkSpec(latency, bandwidth)
    worst = max(copy_points, key=lambda p: abs(fitted.copy_time(p[0]) / p[1] - 1.0))
    notes = [f"copies: {latency * 1e6:.1f} us + bytes / {bandwidth / 1e9:.2f} GB/s fitted on >= {FIT_FROM_BYTES // MIB} MiB; "
             f"worst point {worst[0] / MIB:.0f} MiB: measured {worst[1] * 1e6:.1f} us, fit "
             f"{fitted.copy_time(worst[0]) * 1e6:.1f} us ({fitted.copy_time(worst[0]) / worst[1] - 1:+.1%}); "
             "the simulator interpolates the measured curve (host_link.copy_time_s)",
             f"one {largest.name} expert copy: {copy_idle * 1e3:.3f} ms with the GPU idle, {copy_busy * 1e3:.3f} ms "
             "while expert FFNs run",
             "clocks: " + ("idling does not slow compute measurably" if clock is None else
                           f"a {largest.name} decode layer takes {clock.cold_factor:.2f}x as long when the GPU "
                           f"starts it cold; hot again after {clock.warm_up_s * 1e3:.0f} ms of work, cold after "
                           f"{clock.cool_down_s * 1e3:.1f} ms idle (sim.profiles.ClockSpec)"),
             *[f"executor host time per layer, {m}: {v * 1e6:.1f} us (added to its non-expert layer time); "
               f"per token: {token_overheads[m] * 1e6:.1f} us (not modelled)" for m, v in overheads.items()]]
    torch_version = str(torch.__version__)
    profile = HardwareProfile.from_dict({
        "name": name,
        "description": f"{gpu}, measured by realrun.calibrate",
        "origin": f"realrun.calibrate on {gpu}, torch {torch_version}, "
                  f"{datetime.date.today().isoformat()}; times as realrun's executor achieves them",
        "gpu_memory_bytes": float(torch.cuda.get_device_properties(backend.device).total_memory)
        if backend.is_cuda else 0.0,
        "host_link": {"latency_s": latency, "bandwidth_Bps": bandwidth, "copy_time_s": copy_points},
        "mem_bandwidth_Bps": mem_bw, "matmul_flops": flops, "launch_s": launch,
        "expert_time_s": expert_tables,
        "non_expert_layer_time_s": non_expert_tables,
        **({"clock": clock.to_dict()} if clock is not None else {}),
        "calibration": {"torch": torch_version, "gpu": gpu, "kv_tokens": kv_tokens,
                        "copy_dma_s": dma_points, "layer_host_overhead_s": overheads,
                        "token_host_overhead_s": token_overheads,
                        "copy_under_compute_s": {"bytes": largest.bytes_per_expert, "idle": copy_idle,
                                                 "busy": copy_busy},
                        "clock_response": response,
                        "models": [m.name for m in models]},
    })
    return Calibration(profile, notes)


def _rounded(value):
    """Four significant digits: measurements are not more precise, and the YAML stays readable."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def write_profile(calibration: Calibration, path: Path) -> Path:
    profile = calibration.profile
    header = [f"# {profile.description}", f"# {profile.origin}", *[f"# {n}" for n in calibration.notes],
              "# Regenerate: python -m realrun.calibrate (on the GPU), then python -m realrun.compare."]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(header) + "\n" + yaml.safe_dump(_rounded(profile.to_dict()), sort_keys=False,
                                                                     width=200))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m realrun.calibrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="cuda, cuda:N, or cpu (meaningless numbers; for tests)")
    parser.add_argument("--name", default=None, help="profile name (default: from the GPU, e.g. h100-measured)")
    parser.add_argument("--models", default="all", help="comma-separated model profiles, or 'all' (conf/model)")
    parser.add_argument("--out", default=None, help="YAML path (default: conf/hardware/NAME.yaml)")
    parser.add_argument("--kv-tokens", type=int, default=512)
    parser.add_argument("--quick", action="store_true", help="fewer sizes, token counts and repetitions")
    args = parser.parse_args(argv)

    def work() -> None:
        names = known_models() if args.models == "all" else [n for n in args.models.split(",") if n]
        models = [load_model_spec(n) for n in names]
        if not models:
            raise UserError("--models names no model; give profiles of conf/model or 'all'")
        backend = Backend(args.device)
        quick = dict(copy_sizes=COPY_SIZES[::3], tokens=[1, 8, 64, 512], trials=3, reps=5, copy_reps=8) if args.quick else {}
        result = calibrate(backend, models, args.name, kv_tokens=args.kv_tokens, **quick)
        path = Path(args.out) if args.out else CONF_DIR / "hardware" / f"{result.profile.name}.yaml"
        write_profile(result, path)
        p = result.profile
        print(f"{p.name}: copies {p.host_link.latency_s * 1e6:.1f} us + bytes / {p.host_link.bandwidth_Bps / 1e9:.2f} GB/s; "
              f"device memory {p.mem_bandwidth_Bps / 1e12:.2f} TB/s, bf16 matmul {p.matmul_flops / 1e12:.0f} TFLOP/s, "
              f"launch {p.launch_s * 1e6:.1f} us")
        for note in result.notes:
            print(f"  {note}")
        print(f"wrote {path}")
    run_cli(work)


if __name__ == "__main__":
    main()
