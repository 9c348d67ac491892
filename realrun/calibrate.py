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
- how much slower the executor's work runs right after the GPU waited for a copy, and how fast it
  recovers (after_wait_response), fitted to sim.profiles.AfterWaitSpec.
- each policy's decision time on this host, its hooks and the layer protocol carrying their
  decisions out, beyond all_resident's, and per landed copy beyond lru's, at four budgets
  (realrun.policy_host), replaying --policy-trace (the trace
  realrun.compare will run: the matching policies' cost grows with its layers and training
  requests) in the simulator; with --executor-host, scaled to what the executor's own thread takes
  for the same calls: every policy run briefly on the executor and in the replay alike (the request
  before the replayed ones, a few tokens).
- with --gpus N (N > 1): what joins the GPUs (realrun.fabric): host links alone and all at once
  (host_aggregate_Bps), and GPU-to-GPU copies by size (nvlink); the tables above are GPU 0's.
"""
from __future__ import annotations

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

from conf import CONF_DIR
from policies import available
from policies.base import DEMAND_PRIORITY, Policy
from realrun.api import execute_real
from realrun.backend import Backend
from realrun.clock_probe import DecodeLoop
from realrun.copy_engine import CopyEngine
from realrun.executor import COPY_WAITS, Machine, RealOptions, device_names
from realrun.fabric import Fabric, measure_fabric
from realrun.kernels import REALRUN_FORMAT, NonExpertLayer, copies_beyond_cache, expert_fn, realrun_model
from realrun.memory import HostExperts, SlotPool, random_bf16
from realrun.policy_host import on_executor, policy_host_times
from realrun.preflight import check_calibrate
from realrun.rounds import EXTRA_ROUNDS, MAX_REMEASURES, ROUNDS, SPREAD_LIMIT, Measured, measure, unsettled
from realrun.validate import DEFAULT_CHECKS, Check, validate
from realrun.validate import MAX_REMEASURES as VALIDATION_REMEASURES
from realrun.fit import SCALERS, solve
from realrun.subset import first_layers, held_out_head
from sim.api import execute, prepare
from sim.config import SimConfig
from sim.metrics import Recorder
from sim.placement import PlacedCache
from sim.profiles import AfterWaitSpec, HardwareProfile, LinkSpec
from traces.atomic import atomic_write_text
from traces import ModelSpec, Trace, load_trace
from traces.cli import ArgumentParser, run_cli
from traces.defaults import resolve_trace
from traces.errors import UserError
from traces.model_spec import known_models, load_model_spec
from traces.synthetic import SyntheticParams, generate_synthetic

MIB = 1 << 20
COPY_SIZES = [MIB << i for i in range(10)]  # 1 MiB .. 512 MiB
COPY_ROUNDS = 3  # rounds over all copy sizes (copy_curve)
TOKENS = [1 << i for i in range(10)]  # 1 .. 512
FIT_FROM_BYTES = 8 * MIB
OVERHEAD_LAYERS = 8  # layers of the all-resident run that measures the executor's per-layer host time
OVERHEAD_STEPS = 200
VALIDATION_TOKENS = 64  # decode tokens of the validation's request (gpt-oss-20b's trace: a whole request)


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
class _CopyRig:
    """Copies of one size through a copy engine of its own, as the executor makes them."""

    def __init__(self, backend: Backend, size: int, per_round: int, rounds: int, copy_wait: str):
        self.size, self.per_round, self.backend = size, per_round, backend
        model = ModelSpec(name="copy", num_layers=1, num_experts=rounds * per_round + 2, top_k=1, hidden_size=1,
                          expert_intermediate_size=1, bytes_per_expert_override=size)
        self.host = HostExperts(backend, model, sources=2)
        self.cache = PlacedCache(2 * size, lambda block: size, None)
        self.cache.pool = SlotPool(backend, self.cache.capacity_bytes, {size})
        self.engine = CopyEngine(0, backend, [self.cache], Policy(), Recorder(1), self.host, lambda layer: [size],
                                 sleep_on_copies=copy_wait == "sleep")
        self.next_expert = 0
        for _ in range(2):  # warm-up copies, one from each source buffer (first touches cost more)
            self._copies(1)

    def _copies(self, count: int) -> list[float]:
        """Queue `count` copies at once; the seconds between landings (the first from queueing)."""
        engine, landed = self.engine, []
        for _ in range(count):
            engine.scheduler.fetch((0, self.next_expert, 0), DEMAND_PRIORITY)
            self.next_expert += 1
        started = time.perf_counter()
        while engine.busy:
            if engine.sleep_on_copies:
                engine.sleep_until_landed()
            if engine.poll():
                landed.append(time.perf_counter())
        return list(np.diff([started] + landed))

    def round(self) -> tuple[list[float], float]:
        """One round: seconds per copy through the engine, and the bare DMA time (median)."""
        return self._copies(self.per_round), _dma_time(self.backend, self.cache.pool.buffer[:self.size],
                                                       self.host.buffers[1], self.per_round)


def copy_curve(backend: Backend, sizes: list[int], reps: int, copy_wait: str = "spin",
               rounds: int = COPY_ROUNDS, spread_limit: float = SPREAD_LIMIT
               ) -> tuple[list[list[float]], list[list[float]], dict[str, Measured]]:
    """[[bytes, seconds per copy through the copy engine]], [[bytes, bare DMA seconds]] (medians),
    and each size's rounds; the host waits for each copy as the executor will (copy_wait). Measured
    in rounds over all the sizes (realrun.rounds): on some machines the link's speed drifts over
    seconds, and measured one size after another, one size could catch a slow spell the others miss
    (a 352 MB copy 8% over the line through its neighbours); in rounds every size samples the drift
    alike, and a size whose rounds disagree is measured again."""
    rigs = {size: _CopyRig(backend, size, max(4, min(reps, int(8 * 512 * MIB // size)) // rounds),
                           rounds * (1 + EXTRA_ROUNDS * MAX_REMEASURES), copy_wait) for size in sizes}
    dma: dict[int, list[float]] = {size: [] for size in sizes}

    def probe(rig: _CopyRig) -> Callable[[], float]:
        def one_round() -> float:
            engine_s, dma_s = rig.round()
            dma[rig.size].append(dma_s)
            return float(np.median(engine_s))
        return one_round
    found = measure({f"copy {size}": probe(rig) for size, rig in rigs.items()}, rounds, spread_limit)
    return ([[size, found[f"copy {size}"].value] for size in sizes],
            [[size, float(np.median(dma[size]))] for size in sizes], found)


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
def _rotating(count: int, make: Callable[[int], object]) -> Callable[[], object]:
    """Cycle over `count` copies of some weights (make(i): the i-th), so that timing does not read
    them from the L2 cache."""
    items = [make(i) for i in range(count)]
    state = {"i": 0}

    def next_item():
        state["i"] = (state["i"] + 1) % count
        return items[state["i"]]
    return next_item


def expert_probes(backend: Backend, model: ModelSpec, tokens: list[int], trials: int,
                  reps: int) -> dict[int, Callable[[], float]]:
    """Per token count, one round's expert FFN time: `reps` launched back to back as the executor
    launches a layer's resident experts (whichever of launching and running is slower counts),
    median of `trials`."""
    h = model.hidden_size
    generator = torch.Generator(backend.device).manual_seed(1)
    weights = _rotating(copies_beyond_cache(model.bytes_per_expert),
                        lambda _i: random_bf16(generator, model.bytes_per_expert // 2))
    ffn = expert_fn(model)
    backend.synchronize()

    def probe(t: int) -> Callable[[], float]:
        x = torch.randn(t, h, generator=generator, device=backend.device).to(torch.bfloat16)
        out = torch.zeros_like(x)

        def run() -> None:
            with backend.on_compute():
                out.add_(ffn(x, weights()))
        return lambda: _median_time(run, backend.synchronize, trials, reps)
    return {t: probe(t) for t in tokens}


def non_expert_probes(backend: Backend, model: ModelSpec, tokens: list[int], kv_tokens: int,
                      trials: int) -> dict[int, Callable[[], float]]:
    """Per token count, one round's non-expert layer time: launched, then waited for by polling (the
    executor waits for the router's output every layer), median of `trials`."""
    generator = torch.Generator(backend.device).manual_seed(2)
    per_layer = model.non_expert_params_per_layer * model.bytes_per_param
    # Copies of consecutive layers: where attention alternates (gpt-oss), both kinds are timed, as a model runs them.
    layer = _rotating(2 * -(-copies_beyond_cache(per_layer) // 2),
                      lambda i: NonExpertLayer(model, backend.device, kv_tokens, generator, i))
    backend.synchronize()

    def probe(t: int) -> Callable[[], float]:
        x = torch.randn(t, model.hidden_size, generator=generator, device=backend.device).to(torch.bfloat16)

        def run() -> None:
            with backend.on_compute():
                layer().forward(x)
                done = backend.record_compute()
            while not done.query():
                pass
        return lambda: _median_time(run, backend.synchronize, trials, 1)
    return {t: probe(t) for t in tokens}


def decode_layer_probe(model: ModelSpec, options: RealOptions, work_dir: Path,
                       steps: int = OVERHEAD_STEPS) -> Callable[[], float]:
    """One round's time of a one-token decode layer inside the executor, at its real duty cycle: an
    all-resident run of a few layers of the model (launches, the wait for the router, the experts,
    policy calls, the layer protocol), its token time per layer, median of the second half (warm)."""
    layers = min(OVERHEAD_LAYERS, model.num_layers)
    small = dataclasses.replace(model, num_layers=layers)
    params = SyntheticParams(requests=1, prompt_tokens=(0, 0), output_tokens=(steps, steps))
    trace = load_trace(generate_synthetic(work_dir / f"decode-{model.name}-{options.graphs}", small, params,
                                          overwrite=True))
    machine = Machine(small, dataclasses.replace(options, host_sources=2))
    cfg = SimConfig(trace=str(trace.path), policy="all_resident")

    def one_round() -> float:
        latencies = execute_real(prepare(cfg, trace), machine).token_latencies_s
        return statistics.median(latencies[len(latencies) // 2:]) / layers
    return one_round


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
    ffn = expert_fn(model)
    one = _median_time(lambda: ffn(x, weights), backend.synchronize, 3, 5)
    busy = []
    for _ in range(reps):
        with backend.on_compute():
            for _ in range(int(3 * idle / one) + 1):  # compute outlasting the copy
                ffn(x, weights)
        busy.append(_dma_time(backend, dst, src, 1))
        backend.synchronize()
    return idle, statistics.median(busy)


# --- work after a wait ---
WAIT_BYTES = (8 * MIB, 32 * MIB, 64 * MIB, 176 * MIB, 352 * MIB, 704 * MIB)  # copies of 0.2 .. 15 ms
LAYERS_AFTER_WAIT = 8
REPEATS = 9


def after_wait_response(backend: Backend, model: ModelSpec, kv_tokens: int, copy_wait: str = "spin") -> dict:
    """How the executor's work slows down after the GPU has waited for a copy.

    Decode layers run as the executor runs them (realrun.clock_probe.DecodeLoop: a layer's experts,
    the next non-expert kernels, a wait for the router), and the host time of each launch group is
    measured in rounds: each round times a warm reference (back to back), then the 8 layers after
    waiting for a host-to-GPU copy of each size of 8..704 MiB (as the executor waits,
    RealOptions.copy_wait), as factors of that round's warm times (a warm reference measured once
    drifts away from the waits measured minutes later: factors of 0.7 on one H100); then after 1 s
    of idle. Medians over 9 rounds, in the order the groups ran (experts, non-expert, experts, ...),
    with the spread of each wait's first factor over the rounds. Empty on the CPU."""
    if not backend.is_cuda:
        return {}
    loop = DecodeLoop(backend, model, kv_tokens, max(WAIT_BYTES))

    def factors(layers: list[tuple[float, float, float, float]], warm: tuple[float, float]) -> list[float]:
        return [f for _, _, experts, non_expert in layers for f in (experts / warm[0], non_expert / warm[1])]

    def warm_reference(layers: int) -> tuple[float, float]:
        timed = loop.run(layers)
        return statistics.median(r[2] for r in timed), statistics.median(r[3] for r in timed)

    loop.heat(0.5)
    warms, waits, series = [], {n: [] for n in WAIT_BYTES}, {n: [] for n in WAIT_BYTES}
    for _ in range(REPEATS):
        loop.heat(0.05)
        warm = warm_reference(32)
        warms.append(warm)
        for nbytes in WAIT_BYTES:
            loop.heat(0.05)
            waits[nbytes].append(loop.stall(nbytes, copy_wait))
            series[nbytes].append(factors(loop.run(LAYERS_AFTER_WAIT), warm))
    warm = (statistics.median(w[0] for w in warms), statistics.median(w[1] for w in warms))
    after_wait = [{"wait_s": statistics.median(waits[n]),
                   "factors": [float(f) for f in np.median(np.asarray(series[n]), axis=0)],
                   "first_factor_spread": Measured([s[0] for s in series[n]]).spread} for n in WAIT_BYTES]
    loop.heat(0.05)
    loop.spin(1.0)
    return {"warm_experts_s": warm[0], "warm_non_expert_s": warm[1],
            "warm_spread": Measured([w[0] + w[1] for w in warms]).spread, "after_copy_wait": after_wait,
            "after_1s_idle": {"wait_s": 1.0, "factors": factors(loop.run(LAYERS_AFTER_WAIT), warm)}}


def fit_after_wait(response: dict) -> AfterWaitSpec | None:
    """cold_factor, warm_up_s, cool_down_s of sim.profiles.AfterWaitSpec that best reproduce the
    measured launch groups after each wait (warm before it; its own step function, on a grid);
    None when waiting does not slow the work measurably."""
    if not response:
        return None
    spec = _fit_after_wait(response, [*response["after_copy_wait"], response["after_1s_idle"]])
    if spec is not None and spec.warm_up_s >= AFTER_WAIT_TAU_MAX_S:
        # No recovery within the launch groups measured (on one fresh H200 the GPU ran 1.1-2.6x slow
        # through all 16 after the 1 s idle, and not at all after copy waits): the model's slowdown
        # that work heals cannot be fitted to that, and extrapolated it charged every run as cold
        # (all_resident +80%). Fit the copy waits alone; after_wait_check shows the idle's error.
        spec = _fit_after_wait(response, response["after_copy_wait"])
    return spec


AFTER_WAIT_TAU_MAX_S = 1.0  # the fit's grid of time constants: 10 us .. 1 s


def _fit_after_wait(response: dict, series: list[dict]) -> AfterWaitSpec | None:
    worst = max(max(s["factors"][:2]) for s in series)
    if worst < 1.05:
        return None
    taus = np.geomspace(1e-5, AFTER_WAIT_TAU_MAX_S, 50)
    grid = AfterWaitSpec(np.linspace(1.0, worst * 1.2, 40)[:, None, None], taus[None, :, None], taus[None, None, :])
    warm_s = _warm_groups(response)
    error = np.zeros((40, 50, 50))
    for s in series:
        for i, (wall, measured) in enumerate(zip(_walls_after(grid, s["wait_s"], len(s["factors"]), warm_s, np.ones_like(error)),
                                                 s["factors"])):
            error += (wall / warm_s[i % 2] - measured) ** 2
    i, j, k = np.unravel_index(int(np.argmin(error)), error.shape)
    spec = AfterWaitSpec(float(grid.cold_factor[i, 0, 0]), float(grid.warm_up_s[0, j, 0]),
                         float(grid.cool_down_s[0, 0, k]))
    return spec if spec.cold_factor >= 1.05 else None


def _warm_groups(response: dict) -> tuple[float, float]:
    """Warm seconds of the two launch groups that alternate in a decode layer (experts, non-expert)."""
    return response["warm_experts_s"], response["warm_non_expert_s"]


def _walls_after(spec: AfterWaitSpec, wait_s: float, groups: int, warm_s: tuple[float, float], warmth=1.0) -> list:
    """Wall times the after-wait model gives the `groups` launch groups after a wait of `wait_s`,
    warm before it (floats; or arrays over a grid of specs, `warmth` then ones of the grid's shape)."""
    walls, waited = [], wait_s
    for i in range(groups):
        wall, warmth = spec.step(warmth, waited, warm_s[i % 2])
        walls.append(wall)
        waited = 0.0
    return walls


def after_wait_check(spec: AfterWaitSpec | None, response: dict) -> list[dict]:
    """The after-wait term's own validation, against the measurements it stands for: for each wait
    measured (copies of 8..704 MiB, and 1 s idle), the time of the launch groups after it as the
    model charges them (none: the warm times) against as measured (each factor times its warm time),
    and the relative error. The lru check of the validation tests it in a run; this says at which
    wait lengths the model is off."""
    if not response:
        return []
    warm_s = _warm_groups(response)
    checks = []
    for s in [*response["after_copy_wait"], response["after_1s_idle"]]:
        n = len(s["factors"])
        measured = sum(f * warm_s[i % 2] for i, f in enumerate(s["factors"]))
        model = sum(_walls_after(spec, s["wait_s"], n, warm_s)) if spec is not None else sum(warm_s[i % 2] for i in range(n))
        checks.append({"wait_s": s["wait_s"], "measured_s": measured, "model_s": model, "rel_err": model / measured - 1.0})
    return checks


def one_token_split(non_expert_s: float, expert_s: float, top_k: int, decode_s: float) -> tuple[float, float]:
    """(non-expert, expert) one-token entries whose sum over a layer (non-expert + top_k experts) is
    the decode layer's time measured in the executor (`decode_s`). Time beyond the kernels timed one
    by one is the host's (policy calls, the layer protocol): it goes on the non-expert entry. A
    layer faster than its kernels timed one by one (CUDA graphs: one launch each, no host poll in
    between) has both kernels scaled by the same factor, so that no entry goes negative or is
    clamped at zero (which made the simulator charge gpt-oss twice the measured layer)."""
    kernels = non_expert_s + top_k * expert_s
    if decode_s >= kernels:
        return non_expert_s + decode_s - kernels, expert_s
    scale = decode_s / kernels
    return non_expert_s * scale, expert_s * scale


# --- the profile ---
def profile_name(gpu: str, gpus: int = 1) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-measured'; two of them: 'h100x2-measured'."""
    match = re.search(r"\b([A-Z]{1,3}\d{2,4}[A-Z]?)\b", gpu)
    stem = match.group(1).lower() if match else re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    return f"{stem}{f'x{gpus}' if gpus > 1 else ''}-measured"


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


def _spreads(found: dict[str, Measured]) -> dict:
    """Each quantity's spread over its rounds, and the worst, for the profile and the notes."""
    worst = max(found.items(), key=lambda item: item[1].spread) if found else None
    return {"worst": {"quantity": worst[0], **worst[1].summary()} if worst else None,
            "unsettled": unsettled(found), "remeasured": sorted(n for n, m in found.items() if m.remeasured),
            "spread": {n: m.spread for n, m in found.items()}}


class Measurements:
    """Every term of the profile, each measured in interleaved rounds (realrun.rounds), and each
    measured again on demand (the validation's remeasure): copies, decode_layer (the kernel tables
    and the in-run decode layer), after_wait."""

    def __init__(self, backend: Backend, models: list[ModelSpec], sizes: list[int], tokens: list[int],
                 kv_tokens: int, trials: int, reps: int, copy_reps: int, copy_wait: str, graphs: bool,
                 work_dir: Path, spread_limit: float = SPREAD_LIMIT, decode_steps: int = OVERHEAD_STEPS):
        self.backend, self.models, self.sizes, self.tokens = backend, models, sizes, tokens
        self.kv_tokens, self.trials, self.reps, self.copy_reps = kv_tokens, trials, reps, copy_reps
        self.copy_wait, self.graphs, self.spread_limit = copy_wait, graphs, spread_limit
        self.largest = max(models, key=lambda m: m.bytes_per_expert)
        self.shapes = {m.expert_shape_key: m for m in models}
        options = RealOptions(device=str(backend.device), kv_tokens=kv_tokens, copy_wait=copy_wait)
        # With graphs, one-token passes are graphs and the rest eager: each gets its own in-run time.
        modes = {"eager": options, **({"graphs": dataclasses.replace(options, graphs=True)} if graphs else {})}
        self.decode_probes = {f"decode {m.name} {mode}": decode_layer_probe(m, opts, work_dir, decode_steps)
                              for m in models for mode, opts in modes.items()}
        self.modes = list(modes)
        self.times: dict[str, dict[str, Measured]] = {}
        self.measure_copies()
        self.measure_decode_layer()
        self.measure_after_wait()

    def measure_copies(self) -> None:
        self.copy_points, self.dma_points, self.times["copies"] = copy_curve(
            self.backend, self.sizes, self.copy_reps, self.copy_wait, spread_limit=self.spread_limit)
        self.copy_idle, self.copy_busy = copy_under_compute(self.backend, self.largest)

    def measure_decode_layer(self, one_token: bool = False) -> None:
        """The kernel tables and the in-run decode layer, all in rounds together: a slow spell
        shifts the tables and the layer alike, so their difference (the executor's own time) holds.
        `one_token`: only what a decode step is made of (the one-token kernels and the in-run layer),
        replacing their earlier rounds: what the validation re-measures (prefill entries stay)."""
        per_round = max(1, -(-self.trials // ROUNDS))
        tokens = self.tokens[:1] if one_token else self.tokens
        probes: dict[str, Callable[[], float]] = {}
        for key, m in self.shapes.items():
            probes |= {f"expert {key} {t}": p
                       for t, p in expert_probes(self.backend, m, tokens, per_round, self.reps).items()}
        for m in self.models:  # launch-bound: noisier, four times the trials
            probes |= {f"non_expert {m.name} {t}": p
                       for t, p in non_expert_probes(self.backend, m, tokens, self.kv_tokens, 4 * per_round).items()}
        found = measure(probes | self.decode_probes, spread_limit=self.spread_limit)
        self.times["decode_layer"] = {**self.times.get("decode_layer", {}), **found}
        if self.backend.is_cuda:
            torch.cuda.empty_cache()

    def measure_after_wait(self) -> None:
        self.response = after_wait_response(self.backend, self.largest, self.kv_tokens, self.copy_wait)
        self.after_wait = fit_after_wait(self.response)

    def remeasure(self, term: str) -> None:
        {"copies": self.measure_copies, "decode_layer": lambda: self.measure_decode_layer(one_token=True),
         "after_wait": self.measure_after_wait}[term]()

    def value(self, key: str) -> float:
        return self.times["decode_layer"][key].value

    def tables(self) -> tuple[dict, dict, dict]:
        """expert_time_s, non_expert_layer_time_s, and per model and mode the executor's time per
        one-token decode layer beyond its separately timed kernels (in_run_offset_s)."""
        experts = {key: [[t, self.value(f"expert {key} {t}")] for t in self.tokens] for key in self.shapes}
        non_expert, offsets = {}, {}
        for m in self.models:
            ne_1, ex_1 = self.value(f"non_expert {m.name} 1"), self.value(f"expert {m.expert_shape_key} 1")
            offsets[m.name] = {mode: self.value(f"decode {m.name} {mode}") - (ne_1 + m.top_k * ex_1)
                               for mode in self.modes}
            decode = self.value(f"decode {m.name} {'graphs' if self.graphs else 'eager'}")
            one_ne, one_ex = one_token_split(ne_1, ex_1, m.top_k, decode)
            if self.shapes[m.expert_shape_key] is m:  # the shape's table follows the model measured for it
                experts[m.expert_shape_key][0][1] = one_ex
            # Prefills and batches (eager) get the eager offset on their kernels' time.
            non_expert[m.name] = [[t, one_ne if t == 1 else max(0.0, self.value(f"non_expert {m.name} {t}")
                                                                + offsets[m.name]["eager"])] for t in self.tokens]
        return experts, non_expert, offsets

    def spreads(self) -> dict:
        return {term: _spreads(found) for term, found in self.times.items()}


def _term_notes(m: Measurements, offsets: dict) -> list[str]:
    latency, bandwidth = fit_link(m.copy_points)
    fitted = LinkSpec(latency, bandwidth)
    worst = max(m.copy_points, key=lambda p: abs(fitted.copy_time(p[0]) / p[1] - 1.0))
    aw = m.after_wait
    notes = [f"copies: {latency * 1e6:.1f} us + bytes / {bandwidth / 1e9:.2f} GB/s fitted on >= {FIT_FROM_BYTES // MIB} MiB; "
             f"worst point {worst[0] / MIB:.0f} MiB: measured {worst[1] * 1e6:.1f} us, fit "
             f"{fitted.copy_time(worst[0]) * 1e6:.1f} us ({fitted.copy_time(worst[0]) / worst[1] - 1:+.1%}); "
             "the simulator interpolates the measured curve (host_link.copy_time_s)",
             f"one {m.largest.name} expert copy: {m.copy_idle * 1e3:.3f} ms with the GPU idle, {m.copy_busy * 1e3:.3f} ms "
             "while expert FFNs run",
             "after a wait: " + ("waiting does not slow the work measurably" if aw is None else
                                 f"{m.largest.name} decode layers take up to {aw.cold_factor:.2f}x as long "
                                 f"right after a long wait; warmth returns with time constant "
                                 f"{aw.warm_up_s * 1e3:.2f} ms of work and leaves with "
                                 f"{aw.cool_down_s * 1e3:.2f} ms of waiting (sim.profiles.AfterWaitSpec, "
                                 "fitted to the launch groups after copy waits of 0.2..15 ms, each round against "
                                 "its own warm reference; validated by the lru run below)"),
             *_after_wait_check_note(after_wait_check(aw, m.response)),
             *[f"one-token decode layer in the executor, {name}: " + ", ".join(
                 f"{m.value(f'decode {name} {mode}') * 1e6:.1f} us {mode} ({v * 1e6:+.1f} us beyond its kernels "
                 "timed one by one)" for mode, v in by_mode.items()) for name, by_mode in offsets.items()]]
    if any(v < 0 for by_mode in offsets.values() for v in by_mode.values()):
        notes.append("a negative offset is no host time: each kernel group timed alone pays its launch and the "
                     "host's poll of its end, which inside a decode layer overlap the previous group's run; the "
                     "profile holds the in-run time as measured: its one-token non-expert and expert entries are "
                     "the kernels' times scaled to it (one_token_split)")
    for term, spread in m.spreads().items():
        w = spread["worst"]
        if w is not None:
            notes.append(f"rounds, {term}: worst spread {w['spread']:.1%} ({w['quantity']}, {w['rounds']} rounds)"
                         + (f"; still over {SPREAD_LIMIT:.0%} after re-measuring: {', '.join(spread['unsettled'])}"
                            if spread["unsettled"] else ""))
    return notes


def _after_wait_check_note(checks: list[dict]) -> list[str]:
    if not checks:
        return []
    worst = max(checks, key=lambda c: abs(c["rel_err"]))
    return ["after-wait model against its own measurements (the launch groups after each wait; "
            "calibration.after_wait_check): " + ", ".join(f"{c['wait_s'] * 1e3:.1f} ms {c['rel_err']:+.1%}" for c in checks)
            + f"; worst {worst['rel_err']:+.1%} after {worst['wait_s'] * 1e3:.1f} ms"]


def _build_profile(m: Measurements, name: str, gpu: str, ceilings: tuple[float, float, float],
                   fabric: Fabric | None, host_times: dict | None) -> tuple[HardwareProfile, list[str]]:
    latency, bandwidth = fit_link(m.copy_points)
    experts, non_expert, offsets = m.tables()
    torch_version = str(torch.__version__)
    profile = HardwareProfile.from_dict({
        "name": name,
        "description": f"{gpu}, measured by realrun.calibrate",
        "origin": f"realrun.calibrate on {gpu}, torch {torch_version}, "
                  f"{datetime.date.today().isoformat()}; times as realrun's executor achieves them",
        "gpu_memory_bytes": float(torch.cuda.get_device_properties(m.backend.device).total_memory)
        if m.backend.is_cuda else 0.0,
        "host_link": {"latency_s": latency, "bandwidth_Bps": bandwidth, "copy_time_s": m.copy_points},
        "mem_bandwidth_Bps": ceilings[0], "matmul_flops": ceilings[1], "launch_s": ceilings[2],
        "expert_time_s": experts,
        "non_expert_layer_time_s": non_expert,
        **({"after_wait": m.after_wait.to_dict()} if m.after_wait is not None else {}),
        "calibration": {"torch": torch_version, "gpu": gpu, "kv_tokens": m.kv_tokens, "copy_wait": m.copy_wait,
                        "graphs": m.graphs, "copy_dma_s": m.dma_points,
                        "decode_layer_s": {mm.name: {mode: m.value(f"decode {mm.name} {mode}") for mode in m.modes}
                                           for mm in m.models},
                        "decode_layer_offset_s": offsets,
                        "copy_under_compute_s": {"bytes": m.largest.bytes_per_expert, "idle": m.copy_idle,
                                                 "busy": m.copy_busy},
                        "after_wait_response": m.response, "after_wait_check": after_wait_check(m.after_wait, m.response),
                        "rounds": m.spreads(),
                        "models": [mm.name for mm in m.models],
                        **({"host_bandwidth_Bps": {"alone": fabric.single_Bps, "together": fabric.together_Bps}}
                           if fabric is not None else {})},
        **(fabric_keys(fabric) if fabric is not None else {}),
    })
    if host_times is not None:
        profile = dataclasses.replace(profile, policy_host_s=host_times)
    return profile, _term_notes(m, offsets)


def validation_runners(profile_of: Callable[[], HardwareProfile], trace: Trace, machine: Machine | None,
                       train_fraction: float, max_requests: int | None = None
                       ) -> tuple[Callable[[Check], dict], Callable[..., dict]]:
    """(run on the executor, simulate on the current profile or the one given) for a validation
    check: `trace` (its first `max_requests` replayed requests), at half of all experts, its experts
    in realrun's format. Without a machine only the simulation can be run (realrun.refit)."""
    budget = f"{trace.model.num_layers * trace.model.num_experts // 2}experts"

    def config(check: Check, profile: HardwareProfile | None = None) -> SimConfig:
        return SimConfig(trace=str(trace.path), policy=check.policy, budget=budget,
                         hardware=(profile or profile_of()).to_dict(), train_fraction=train_fraction,
                         max_requests=max_requests, expert_format=REALRUN_FORMAT)

    def summary(result) -> dict:
        m = result.metrics
        return {"tpot_mean_s": m.tpot_mean_s, "hit_rate": m.hit_rate, "ttft_mean_s": m.ttft_mean_s}
    return (lambda c: summary(execute_real(prepare(config(c), trace), machine)),
            lambda c, profile=None: summary(execute(prepare(config(c, profile), trace))))


def with_fits(profile: HardwareProfile, model: ModelSpec, fitted: dict[str, float]) -> HardwareProfile:
    """`profile` with each fitted term scaled (realrun.fit), in the order they were fitted."""
    for term, factor in fitted.items():
        profile = SCALERS[term][0](profile, model, factor)
    return profile


def fit_to(run_sim: Callable[..., dict], profile_of: Callable[[], HardwareProfile], model: ModelSpec,
           fitted: dict[str, float], rebuild: Callable[[], None]) -> Callable[[Check, float], float | None]:
    """validate's fit: the check's term scaled until its simulation on the current profile gives the
    target mean TPOT; the scale kept in `fitted`, and the profile rebuilt with it."""
    def fit(check: Check, target: float) -> float | None:
        scaler, bounds = SCALERS[check.term]
        base = profile_of()
        if check.term == "after_wait" and base.for_model(model.name).after_wait is None:
            return None
        fitted[check.term] = solve(lambda s: run_sim(check, scaler(base, model, s))["tpot_mean_s"], target, bounds)
        rebuild()
        return fitted[check.term]
    return fit


def calibrate(backend: Backend, models: list[ModelSpec], name: str | None = None, copy_sizes: list[int] | None = None,
              tokens: list[int] | None = None, kv_tokens: int = RealOptions.kv_tokens, trials: int = 7, reps: int = 20,
              copy_reps: int = 30, copy_wait: str = "spin", graphs: bool = False,
              others: list[Backend] | None = None, policy_trace: Trace | None = None,
              train_fraction: float = 0.0, validate_runs: bool = True, host_sources: int = 8,
              spread_limit: float = SPREAD_LIMIT, validation_remeasures: int = VALIDATION_REMEASURES,
              decode_steps: int = OVERHEAD_STEPS, max_requests: int | None = None,
              executor_host: bool = False, fit_terms: bool = True) -> Calibration:
    """`backend`'s tables; with `others` (more devices of the same kind), what joins them all too;
    with `policy_trace`, every policy's host time replaying it (its leading `train_fraction` trains),
    scaled to the executor's on short runs of every policy (executor_host; realrun.policy_host.on_executor),
    and (validate_runs) the profile validated on short executor runs of it (realrun.validate) on a
    request compare does not measure, the terms still off then taken from those runs (fit_terms)."""
    tokens = tokens or TOKENS
    gpu = backend.name
    backends = [backend, *(others or [])]
    name = name or profile_name(gpu, len(backends))
    sizes = sorted(set(copy_sizes or COPY_SIZES) | {m.bytes_per_expert for m in models})
    with tempfile.TemporaryDirectory() as tmp:
        measured = Measurements(backend, models, sizes, tokens, kv_tokens, trials, reps, copy_reps, copy_wait, graphs,
                                Path(tmp), spread_limit, decode_steps)
        ceilings = device_ceilings(backend)
        fabric = measure_fabric(backends, measured.largest.bytes_per_expert) if len(backends) > 1 else None
        profile, notes = _build_profile(measured, name, gpu, ceilings, fabric, None)
        host_times = hook_times = on_real = None
        machine = None
        if policy_trace is not None and (validate_runs or executor_host):
            machine = Machine(policy_trace.model, RealOptions(device=str(backend.device), kv_tokens=kv_tokens,
                                                              copy_wait=copy_wait, graphs=graphs,
                                                              host_sources=host_sources))
        if policy_trace is not None:
            host_times, hook_times = policy_host_times(policy_trace, profile, train_fraction,
                                                       max_requests=max_requests)
            if executor_host:
                replayed = host_times
                host_times, on_real = on_executor(
                    host_times, policy_trace, profile, train_fraction,
                    lambda run, observer: execute_real(run, machine, observer=observer), REALRUN_FORMAT,
                    Path(tmp) / "head")
        fitted: dict[str, float] = {}  # terms taken from the validation's executor runs (realrun.fit)

        def build() -> tuple[HardwareProfile, list[str]]:
            built, built_notes = _build_profile(measured, name, gpu, ceilings, fabric, host_times)
            return (with_fits(built, policy_trace.model, fitted) if fitted else built), built_notes
        profile, notes = build()
        validation = None
        if policy_trace is not None and validate_runs:
            current = {"profile": profile}

            def rebuild() -> None:
                current["profile"], _ = build()

            def remeasure(term: str) -> None:
                measured.remeasure(term)
                rebuild()
            # A request compare does not measure: what the checks fit is checked on the others.
            short, fraction, request = held_out_head(policy_trace, train_fraction, VALIDATION_TOKENS,
                                                     Path(tmp) / "validation")
            run_real, run_sim = validation_runners(lambda: current["profile"], short, machine, fraction, 1)
            checks = [c for c in DEFAULT_CHECKS if c.policy in available()]
            fit = fit_to(run_sim, lambda: current["profile"], policy_trace.model, fitted, rebuild) if fit_terms else None
            validation = validate(checks, run_real, run_sim, remeasure, max_remeasures=validation_remeasures, fit=fit)
            profile, notes = build()
        machine = None  # its host buffers freed before the profile is written
    if host_times is not None:
        profile.extra["calibration"]["policy_host_trace"] = (f"{policy_trace.source.label()}, {policy_trace.model.num_layers} "
                                                             f"layers, train fraction {train_fraction}")
        profile.extra["calibration"]["policy_hooks_s"] = {n: t.to_dict() for n, t in hook_times.items()}
        notes.append("policy host time per layer / per pass / per landed copy (us), decisions carried out, beyond "
                     "all_resident's (per landed copy: beyond lru's): " + ", ".join(
                         f"{n} {t.layer_s * 1e6:.1f} / {t.step_s * 1e6:.1f} / {t.land_s * 1e6:.1f}"
                         for n, t in host_times.items()))
        notes.append("policy host time per layer / per pass (us), the policy's hooks alone: " + ", ".join(
            f"{n} {t.layer_s * 1e6:.1f} / {t.step_s * 1e6:.1f}" for n, t in hook_times.items()))
    if on_real is not None:
        profile.extra["calibration"]["policy_host_executor"] = on_real
        profile.extra["calibration"]["policy_host_replay_s"] = {n: t.to_dict() for n, t in replayed.items()}
        notes.append(f"policy host time on the executor over the replay (request {on_real['request']}, "
                     f"{on_real['tokens']} tokens, {on_real['share']:.0%} of the experts; per layer / pass / landed "
                     "copy, a factor or +us where the replay's was too small to scale): " + ", ".join(
                         f"{n} " + " / ".join(f"{f:.2f}x" if not added else f"{added * 1e6:+.0f}us"
                                              for f, added in r["scale"])
                         for n, r in on_real["policies"].items()))
    if validation is not None:
        profile.extra["calibration"]["validation"] = {**validation.to_dict(), "request": request,
                                                      "tokens": VALIDATION_TOKENS, "fitted": dict(fitted)}
        notes += validation.notes()
        notes += [f"validation: {term} fitted at the bound of its scale ({factor:g}x): its check's error is not "
                  "that term's alone" for term, factor in fitted.items() if factor in SCALERS[term][1]]
    if fabric is not None:
        notes += fabric.notes()
    return Calibration(profile, notes)


def fabric_keys(fabric: Fabric) -> dict:
    """The profile's multi-GPU keys: num_gpus, nvlink (any direct GPU-to-GPU path, NVLink or PCIe
    peer-to-peer: the simulator charges the hidden state's crossing to it), host_aggregate_Bps."""
    nvlink = None
    if fabric.peer_curve:
        latency, bandwidth = fit_link(fabric.peer_curve)
        nvlink = {"latency_s": latency, "bandwidth_Bps": bandwidth, "copy_time_s": fabric.peer_curve,
                  "pairs": fabric.pairs}
    return {"num_gpus": len(fabric.single_Bps), "nvlink": nvlink, "host_aggregate_Bps": fabric.host_aggregate_Bps}


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
    parser = ArgumentParser(prog="python -m realrun.calibrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=RealOptions.device, help="cuda, cuda:N, or cpu (meaningless numbers; for tests)")
    parser.add_argument("--name", default=None, help="profile name (default: from the GPU, e.g. h100-measured)")
    parser.add_argument("--models", default="all", help="comma-separated model profiles, or 'all' (conf/model)")
    parser.add_argument("--out", default=None, help="YAML path (default: conf/hardware/NAME.yaml)")
    parser.add_argument("--kv-tokens", type=int, default=RealOptions.kv_tokens)
    parser.add_argument("--copy-wait", default=RealOptions.copy_wait, choices=COPY_WAITS,
                        help="how the executor will wait for blocks (realrun copy_wait): the after-wait slowdown depends on it")
    parser.add_argument("--graphs", action="store_true",
                        help="the executor will launch decode passes as CUDA graphs: its all-resident run uses them "
                             "(the per-layer host time); the kernel tables stay eager")
    parser.add_argument("--gpus", type=int, default=RealOptions.gpus,
                        help="devices cuda:0..N-1 of one kind: also measure what joins them (a multi-GPU profile)")
    parser.add_argument("--policy-trace", default="default",
                        help="trace whose replay times every policy's decisions ('none': skip); give the one "
                             "realrun.compare will run")
    parser.add_argument("--policy-layers", type=int, default=None, help="its first N layers (as compare --layers)")
    parser.add_argument("--train-fraction", type=float, default=0.0,
                        help="its leading share that trains the policies (as compare --train-fraction)")
    parser.add_argument("--executor-host", action="store_true",
                        help="scale the policies' replayed host time to short executor runs of each (two fresh H200s "
                             "of 2026-12-04: no closer to the measured runs; docs/realrun/h200-gpt-oss-20b.md)")
    parser.add_argument("--no-fit", action="store_true",
                        help="leave a term the validation finds off as measured (with its residual) instead of "
                             "taking it from the validation's executor runs (realrun.fit)")
    parser.add_argument("--no-validate", action="store_true",
                        help="skip the validation (short all_resident, lru and oracle_prefetch runs of --policy-trace "
                             "on the executor, simulated on the new profile)")
    parser.add_argument("--max-requests", type=int, default=None,
                        help="the policy host times and validation runs replay only the first N requests after "
                             "the training split (as compare --max-requests)")
    parser.add_argument("--host-sources", type=int, default=RealOptions.host_sources,
                        help="the validation runs' pinned host buffers shared by experts (0: one each), as compare's")
    parser.add_argument("--quick", action="store_true", help="fewer sizes, token counts and repetitions")
    args = parser.parse_args(argv)

    def work() -> None:
        names = known_models() if args.models == "all" else [n for n in args.models.split(",") if n]
        models = [realrun_model(load_model_spec(n)) for n in names]  # bf16 experts: realrun's kernels
        if not models:
            raise UserError("--models names no model; give profiles of conf/model or 'all'")
        check_calibrate(args.device, models, args.gpus)  # a GPU, and memory enough, before any work
        backends = [Backend(d) for d in device_names(RealOptions(device=args.device, gpus=args.gpus))]
        if len({b.name for b in backends}) > 1:
            raise UserError(f"--gpus {args.gpus}: the devices differ ({', '.join(sorted({b.name for b in backends}))}); "
                            "one profile describes GPUs of one kind")
        quick = dict(copy_sizes=COPY_SIZES[::3], tokens=[1, 8, 64, 512], trials=3, reps=5, copy_reps=8) if args.quick else {}
        with tempfile.TemporaryDirectory() as scratch:  # the subset trace the policies replay
            policy_trace = None
            if args.policy_trace != "none":
                policy_trace = load_trace(resolve_trace(args.policy_trace))
                if args.policy_layers is not None:
                    policy_trace = first_layers(policy_trace, args.policy_layers, Path(scratch) / "trace")
            result = calibrate(backends[0], models, args.name, kv_tokens=args.kv_tokens, copy_wait=args.copy_wait,
                               graphs=args.graphs, others=backends[1:], policy_trace=policy_trace,
                               train_fraction=args.train_fraction, validate_runs=not args.no_validate,
                               executor_host=args.executor_host, fit_terms=not args.no_fit,
                               host_sources=args.host_sources,
                               max_requests=args.max_requests, **quick)
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


def cpu_expert_section(models, tokens=(1, 2, 4, 8, 16, 32, 64, 128), threads=None, **spec) -> dict:
    """The host CPU's expert-FFN tables for a profile's `cpu:` section (realrun.cpu_experts)."""
    from realrun.cpu_experts import cpu_section
    return cpu_section(list(models), list(tokens), threads=threads, **spec)


if __name__ == "__main__":
    main()
