"""Offloaded MoE inference on real devices: the simulator's replay, with real kernels and copies.

The order of calls is the simulator's, call for call (request start; per pass: step start, and per
layer: non-expert kernels, on_layer_start once the router's output has reached the host,
start_layer, the experts in its order, each launched as soon as its blocks are resident, unpin;
step end; request end), through the same engine-neutral pieces (sim.replay, sim.schedule,
sim.layer_protocol, sim.cache, sim.copy_scheduler under the copy engine), and requests are served as
the simulator serves them (a waiting request starts with its prefill pass alone while the running
batch has room, otherwise one decode pass for the whole batch). So a policy whose decisions do not
depend on timing (lru, belady) makes exactly the same hits and misses as in the simulator, with
C clients and batching too (closed loop).

One thread drives everything cooperatively: kernels are launched asynchronously on the compute
stream, and while the host waits (for the router's output, a block, the end of a token) it polls
the copy engine, which starts the next copy or chunk as soon as the last one lands.

Layers are split in order over the devices (placement "layers", like a device_map), each with its
own expert cache, slot pool and copy engine; the hidden state moves to the next device at the
boundaries. Not made here (yet): expert-parallel placement and NVLink peer fetches.
"""
from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import torch

from policies.base import Block, Policy, PolicyContext, PrefetchPlan, Step, Timing
from realrun.backend import DONE, Backend, Event
from realrun.copy_engine import CopyEngine
from realrun.graphs import DecodeGraphs
from realrun.kernels import NonExpertLayer, expert_fn, expert_weights, realrun_model
from realrun.memory import HostExperts, SlotPool
from sim.compute import ComputeModel
from sim.errors import StallError
from sim.layer_protocol import HostObserver, split_cpu
from sim.metrics import Recorder
from sim.placement import PlacedCache, aligned
from sim.profiles import HardwareProfile
from sim.replay import (RunState, Serving, SimOptions, arrival_times, bind_policy, cache_capacities,
                        check_options, check_room, initial_blocks, part_bytes, pass_step, policy_future, warm)
from sim.schedule import Pass, request_passes
from sim.topology import Topology
from traces import ModelSpec, Trace
from traces.errors import UserError


COPY_WAITS = ("spin", "sleep")  # RealOptions.copy_wait


@dataclass
class RealOptions:
    device: str = "auto"  # auto (CUDA if present, else CPU), cpu, cuda, cuda:N
    gpus: int = 1  # devices the layers are split over, in order
    host_sources: int = 8  # pinned host buffers the experts share; 0: one per expert
    kv_tokens: int = 512  # KV-cache length each decode token attends to
    copy_wait: str = "spin"  # waiting for a block: poll the copy's event (spin), or sleep until it lands (sleep)
    graphs: bool = False  # one-token decode passes as CUDA graphs (realrun.graphs), on every device
    seed: int = 0


def device_names(options: RealOptions) -> list[str]:
    n = options.gpus
    if n < 1:
        raise UserError(f"gpus={n}: need at least one device")
    if n == 1 or options.device == "cpu":
        return [options.device] * n
    if options.device not in ("auto", "cuda"):
        raise UserError(f"gpus={n} with device '{options.device}': give device=cuda (devices cuda:0..{n - 1}) or cpu")
    if torch.cuda.device_count() < n:
        raise UserError(f"gpus={n}, but this machine has {torch.cuda.device_count()} CUDA devices")
    return [f"cuda:{i}" for i in range(n)]


class Machine:
    """What every run of one model shares: devices, non-expert weights, and the experts' host copies."""

    def __init__(self, model: ModelSpec, options: RealOptions | None = None, non_expert: bool = True,
                 random_experts: bool = True):
        """non_expert=False: no non-expert weights (a live model brings its own); random_experts=False:
        host buffers left for the caller to fill, one per expert."""
        self.model = model = realrun_model(model)  # bf16 experts: what its kernels read
        self.expert = expert_fn(model)  # f(x, weights): the model's expert FFN
        self.options = options = options or RealOptions()
        if options.copy_wait not in COPY_WAITS:
            raise UserError(f"copy_wait={options.copy_wait}: give one of {', '.join(COPY_WAITS)}")
        self.backends = [Backend(d) for d in device_names(options)]
        n, layers = len(self.backends), model.num_layers
        if n > layers:
            raise UserError(f"gpus={n} for {layers} layers: use at most one device per layer")
        if options.graphs and not non_expert:
            raise UserError("graphs=true needs realrun's own layers; a live model runs eagerly")
        # The simulator's "layers" placement; no NVLink peers (realrun makes host copies only).
        self.topology = Topology(n, "layers", tuple(l * n // layers for l in range(layers)), ((),) * n)
        generators = [torch.Generator(b.device).manual_seed(options.seed + i) for i, b in enumerate(self.backends)]
        self.layers = [NonExpertLayer(model, self.backends[g].device, options.kv_tokens, generators[g], layer)
                       for layer, g in enumerate(self.topology.layer_gpu)] if non_expert else []
        self.host = HostExperts(self.backends[0], model, options.host_sources if random_experts else 0, options.seed,
                                fill=random_experts)
        self._inputs: dict[int, torch.Tensor] = {}
        self._warm_tokens: set[int] = set()
        # One set of graphs per device: its layers, the places of its cache, its own x and y.
        self.graphs = [DecodeGraphs(b, model.hidden_size, self.expert) for b in self.backends] if options.graphs else None

    @property
    def device_name(self) -> str:
        names = sorted({b.name for b in self.backends})
        return f"{len(self.backends)} x {names[0]}" if len(self.backends) > 1 else names[0]

    def layers_of(self, gpu: int) -> list[int]:
        return self.topology.layers_of(gpu)

    def input(self, tokens: int) -> torch.Tensor:
        """The hidden state entering layer 0 for a pass of `tokens` tokens (random, reused)."""
        x = self._inputs.get(tokens)
        if x is None:
            g = torch.Generator(self.backends[0].device).manual_seed(tokens)
            x = self._inputs[tokens] = torch.randn(tokens, self.model.hidden_size, generator=g, device=g.device,
                                                   dtype=torch.float32).to(torch.bfloat16)
        return x

    def warm_up(self, token_counts: set[int], expert_bytes: int) -> None:
        """Run every kernel shape once before timing (library handles, kernel selection)."""
        todo = sorted(set(token_counts) - self._warm_tokens)
        if not todo:
            return
        for gpu, backend in enumerate(self.backends):
            scratch = expert_weights(backend.empty(expert_bytes))
            scratch.normal_(0.0, 0.02)
            backend.synchronize()  # made on the default stream, read on the compute stream
            with backend.on_compute():
                for tokens in todo:
                    y = self.input(tokens).to(backend.device)
                    if self.layers:
                        _, y = self.layers[self.layers_of(gpu)[0]].forward(y)
                    self.expert(y, scratch)
            with backend.on_copy():
                source = self.host.buffers[0]
                backend.empty(source.numel()).copy_(source, non_blocking=True)
            backend.synchronize()
            del scratch
        self._warm_tokens.update(todo)
        if self.graphs is not None and 1 in self._warm_tokens:
            for gpu, graphs in enumerate(self.graphs):
                graphs.capture_layers({layer: self.layers[layer] for layer in self.layers_of(gpu)})

    def notes(self) -> list[str]:
        opts = self.options
        notes = [f"device: {self.device_name} (torch {torch.__version__})", f"host experts: {self.host.describe()}"]
        if self.layers:
            notes.append(f"attention over a KV cache of {opts.kv_tokens} tokens")
        return notes


class Timeline:
    """Where a real run's time went: for every kernel group (a layer's non-expert kernels, one
    expert), when the host launched it and when it ran on the GPU; for every wait for a block, when
    the host waited; for the host's own work (kinds policy, start_layer, apply), when it ran; for
    a layer's CPU experts (kind cpu, `expert` holding how many), when the FFN ran on its worker; for
    every chunk that landed (kind land, `expert` holding the GPU), the host's time to handle it and
    start the next one.
    GPU times come from timing events measured against one reference event per device, placed on
    the host's clock (time.perf_counter) when it completed, so host, GPU and clock samples
    (realrun.gpu_clocks) share one axis. On the CPU the GPU columns are NaN."""

    COLUMNS = ["step", "layer", "kind", "expert", "host_s", "host_end_s", "gpu_start_s", "gpu_end_s"]

    def __init__(self):
        self._refs: dict[torch.device, tuple[torch.cuda.Event, float]] = {}
        self._rows: list[list] = []

    def begin(self, backends: list[Backend]) -> None:
        for backend in backends:
            if backend.is_cuda and backend.device not in self._refs:
                backend.synchronize()
                ref = torch.cuda.Event(enable_timing=True)
                ref.record(backend.compute_stream)
                ref.synchronize()
                self._refs[backend.device] = ref, time.perf_counter()

    @contextlib.contextmanager
    def group(self, backend: Backend, step: int, layer: int, kind: str, expert: int = -1):
        start = end = None
        if backend.is_cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record(backend.compute_stream)
        host = time.perf_counter()
        yield
        if backend.is_cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record(backend.compute_stream)
        self._rows.append([step, layer, kind, expert, host, time.perf_counter(), backend.device, start, end])

    def wait(self, step: int, layer: int, host_s: float, host_end_s: float) -> None:
        self.span(step, layer, "stall", -1, host_s, host_end_s)

    def span(self, step: int, layer: int, kind: str, expert: int, host_s: float, host_end_s: float) -> None:
        self._rows.append([step, layer, kind, expert, host_s, host_end_s, None, None, None])

    @contextlib.contextmanager
    def host(self, step: int, layer: int, kind: str):
        """Host work that launches nothing (the policy deciding, the layer's copies queued): where
        the host thread's time goes between kernel groups."""
        host = time.perf_counter()
        yield
        self.span(step, layer, kind, -1, host, time.perf_counter())

    def frame(self) -> pd.DataFrame:
        """After the run (its devices synchronized)."""
        rows = []
        for step, layer, kind, expert, host, host_end, device, start, end in self._rows:
            gpu_start = gpu_end = float("nan")
            if start is not None:
                ref, ref_host = self._refs[device]
                gpu_start = ref_host + ref.elapsed_time(start) / 1e3
                gpu_end = ref_host + ref.elapsed_time(end) / 1e3
            rows.append([step, layer, kind, expert, host, host_end, gpu_start, gpu_end])
        return pd.DataFrame(rows, columns=self.COLUMNS)


@contextlib.contextmanager
def collector_paused():
    """Python's cyclic collector would stop the host for tens of ms at random tokens; serving
    processes freeze what was loaded and keep it off while they serve. So do timed runs here."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


class Executor(Serving):
    def __init__(self, machine: Machine, trace: Trace | None, policy: Policy, model: ModelSpec,
                 hardware: HardwareProfile, budget_bytes: int, requests: list[int], options: SimOptions | None = None,
                 on_request_done: Callable[[int], None] | None = None, timeline: Timeline | None = None,
                 observer: HostObserver | None = None):
        """`hardware` is the profile the simulator runs the same replay on: a policy that plans with
        profiled costs (ctx.timing) must see the same numbers in both engines. `timeline`, when
        given, records every kernel group and wait (two timing events per group); `observer`, told
        every host call's duration (sim.layer_protocol.HostCalls), as the SimPy engine tells it."""
        opts = self.options = options or SimOptions()
        if model.num_layers != machine.model.num_layers or model.expert_shape_key != machine.model.expert_shape_key:
            raise UserError(f"the machine was built for {machine.model.name} ({machine.model.num_layers} layers), "
                            f"the run needs {model.name} ({model.num_layers} layers)")
        if model.bytes_per_expert != machine.model.bytes_per_expert:
            raise UserError(f"the run's experts are {model.expert_format} ({model.bytes_per_expert} B), realrun's "
                            f"kernels read {machine.model.expert_format} ({machine.model.bytes_per_expert} B): "
                            f"run with expert_format={machine.model.expert_format}")
        topo = machine.topology
        if opts.placement != "layers" or opts.gpus not in (None, topo.num_gpus):
            raise UserError(f"realrun runs placement=layers on the machine's {topo.num_gpus} device(s); "
                            f"asked for placement={opts.placement}, gpus={opts.gpus}")
        check_options(opts, policy)
        self.machine = machine
        self.trace = trace
        self.policy = policy
        self.model = model
        self.hardware = hardware
        self.requests = list(requests)
        self.recorder = Recorder(model.num_layers)
        self.topology = topo
        self.part_fractions: list[tuple[float, ...]] = [(1.0,)] * model.num_layers
        self._part_bytes: list[list[int]] = [[model.bytes_per_expert]] * model.num_layers
        self.caches = [PlacedCache(capacity, self._block_bytes, None)
                       for capacity in cache_capacities(policy, model, topo, budget_bytes, opts.budget_scope)]
        self.serving_state(None if trace is None else arrival_times(opts, trace, self.requests), on_request_done,
                           observer)
        sleep = machine.options.copy_wait == "sleep"
        self.copies = [CopyEngine(g, backend, self.caches, policy, self.recorder, machine.host, self._part_bytes_of,
                                  sleep, self.calls.chunk_landed, observer) for g, backend in enumerate(machine.backends)]
        self.links = [copies.scheduler for copies in self.copies]  # what the layer protocol queues copies on
        self._t0 = 0.0
        self.timeline = timeline
        self.cpu = None  # realrun.cpu_experts.CpuLayer, for policies that compute experts on the CPU

    def _block_bytes(self, block: Block) -> int:
        return self._part_bytes[block[0]][block[2]]

    def _part_bytes_of(self, layer: int) -> list[int]:
        return self._part_bytes[layer]

    def prepare(self, train_requests: list[int]) -> None:
        """Bind the policy, let it learn, fix expert splits, give each cache its memory, warm it."""
        machine, model, topo = self.machine, self.model, self.topology
        compute = ComputeModel(self.hardware, model)
        cpu = self.hardware.cpu is not None
        timing = Timing(self.hardware.host_link.copy_time, compute.expert_time, compute.non_expert_time,
                        compute.cpu_expert_time if cpu else None,
                        (lambda tokens: sum(compute.activation_time(tokens))) if cpu else None)
        ctx = PolicyContext(model, self.caches, topo.home, topo.layers_of, np.random.default_rng(self.options.seed),
                            policy_future(self.policy, self.trace, self.requests), timing)
        self.part_fractions = bind_policy(self.policy, ctx, self.trace, train_requests)
        self._part_bytes = [part_bytes(model, f) for f in self.part_fractions]
        check_room(self.policy, self.caches, self._part_bytes, self.options.budget_scope)
        sizes = {n for parts in self._part_bytes for n in parts}
        for gpu, cache in enumerate(self.caches):
            backend = machine.backends[gpu]
            cache.pool = SlotPool(backend, cache.capacity_bytes, sizes)
            placed = warm(cache, self.policy, initial_blocks(self.policy, ctx, gpu, self.part_fractions,
                                                             self.options.warm_start))
            with backend.on_copy():  # after any slide that warming made room with
                for block in placed:
                    if cache.is_resident(block):
                        cache.pool.view(block).copy_(machine.host.block(block, self._part_bytes[block[0]]))
        passes = [spec for r in self.requests for spec in request_passes(self.trace, r)] if self.trace else []
        tokens = {spec.tokens for spec in passes} | {t for spec in passes for l in (spec.expert_tokens or []) for t in l}
        tokens |= set(range(1, self.options.max_batch + 1))
        machine.warm_up(tokens, max(max(b) for b in self._part_bytes))
        if self.policy.uses_cpu:  # realrun.cpu_experts: experts computed on the host CPU
            if self.hardware.cpu is None:
                raise UserError(f"policy '{self.policy.name}' computes experts on the CPU: give a hardware "
                                "profile with a cpu section")
            from realrun.cpu_experts import CpuLayer
            self.cpu = CpuLayer(model, max(tokens), pin=machine.backends[0].device.type == "cuda")
        if machine.graphs is not None:
            for cache, graphs in zip(self.caches, machine.graphs):
                graphs.capture_experts(self._graph_places(cache, sizes))

    @staticmethod
    def _graph_places(cache: PlacedCache, sizes: set[int]) -> list[torch.Tensor]:
        """Every place of the cache an expert can take, when all blocks are alike (an unequal pool
        places blocks anywhere; its experts run eagerly)."""
        if len(sizes) > 1:
            return []
        (nbytes,) = sizes
        pool, step = cache.pool, aligned(nbytes)
        return [pool.buffer[o: o + nbytes] for o in range(0, pool.arena_bytes - step + 1, step)]

    def release(self) -> None:
        """Give the caches' device memory back now (the next run's pool may need all of it)."""
        for cache in self.caches:
            cache.pool = None
        for graphs in self.machine.graphs or []:
            graphs.drop_experts()
        if self.cpu is not None:
            self.cpu.close()
        gc.collect()
        if any(b.is_cuda for b in self.machine.backends):
            torch.cuda.empty_cache()

    # --- waiting: the host polls the copy engines whenever it has nothing else to do ---
    def start_clock(self) -> None:
        """now() counts from here (the start of serving)."""
        self._t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self._t0

    def _timed(self, backend: Backend, layer: int, kind: str, expert: int = -1):
        if self.timeline is None:
            return contextlib.nullcontext()
        return self.timeline.group(backend, self.next_step - 1, layer, kind, expert)

    def _host_timed(self, layer: int, kind: str):
        if self.timeline is None:
            return contextlib.nullcontext()
        return self.timeline.host(self.next_step - 1, layer, kind)

    def _poll(self) -> bool:
        landed = False
        for gpu, copies in enumerate(self.copies):
            polled = time.perf_counter()
            if copies.poll():
                landed = True
                if self.timeline is not None:  # a chunk's landing handled and the next one started
                    self.timeline.span(self.next_step - 1, -1, "land", gpu, polled, time.perf_counter())
        return landed

    def wait(self, event: Event) -> None:
        """Until the event has completed, polling the copy engines meanwhile."""
        while not event.query():
            self._poll()

    def drain(self) -> None:
        """Land every copy still queued after the last request, as the simulator does (its clock runs
        until no event is left): both engines then count the same prefetched bytes."""
        while any(copies.busy for copies in self.copies):
            self._poll()

    def _wait_block(self, copies: CopyEngine, block: Block) -> None:
        cache = copies.cache
        while not cache.is_resident(block):
            if copies.sleep_on_copies and len(self.copies) == 1:  # nothing else to poll meanwhile
                copies.sleep_until_landed()
            if not self._poll() and not copies.busy:
                raise StallError(f"the layer waits for block {block}, but nothing is copying and nothing will: "
                                 f"{copies.scheduler.describe_wait()}; this is a bug in the engine or the policy")

    # --- requests: served as the simulator serves them ---
    def run(self) -> RunState:
        for backend in self.machine.backends:
            backend.synchronize()
        if self.timeline is not None:
            self.timeline.begin(self.machine.backends)
        with collector_paused():
            return self._serve()

    def _serve(self) -> RunState:
        self.start_clock()
        if self._arrivals is None:
            for _ in range(min(self.options.clients, len(self.requests))):
                self._arrive(0.0)
        for spec in self.serving_loop():
            if spec is not None:
                self._pass(spec)
            else:
                self._poll()  # idle until the next arrival
        self.drain()
        makespan = self.now()
        for backend in self.machine.backends:
            backend.synchronize()  # a prefetch still copying must not spill into the next run
        return RunState(self.recorder, list(self.caches), makespan)

    def _arrivals_due(self) -> None:
        arrivals = self._arrivals
        while arrivals is not None and self._issued < len(arrivals) and arrivals[self._issued] <= self.now():
            self._arrive(float(arrivals[self._issued]))

    # --- forward passes ---
    def _apply(self, plan: PrefetchPlan | None) -> None:
        with self._host_timed(-1, "apply"):
            self.calls.apply_plan(plan, self.policy, self.model.num_layers, self.links, self.topology.home)

    def _pass(self, spec: Pass) -> None:
        machine, policy = self.machine, self.policy
        step = pass_step(self.next_step, spec, self.trace)
        self.step_started(step)
        probs, experts, expert_tokens = spec.probs, spec.experts, spec.expert_tokens
        x = machine.input(spec.tokens)
        gpu = self.topology.layer_gpu[0]
        backend = machine.backends[gpu]
        device_graphs = machine.graphs if spec.tokens == 1 and expert_tokens is None else None
        graphs = None if device_graphs is None else device_graphs[gpu]
        if graphs is not None:
            with backend.on_compute():
                graphs.x.copy_(x)
        for layer in range(self.model.num_layers):
            previous_backend, previous_graphs = backend, graphs
            gpu = self.topology.layer_gpu[layer]
            backend = machine.backends[gpu]
            crossing = backend is not previous_backend
            if crossing:
                backend.compute_waits_for(previous_backend.record_compute())
                graphs = None if device_graphs is None else device_graphs[gpu]
            with backend.on_compute(), self._timed(backend, layer, "non_expert"):
                if graphs is None:
                    x, y = machine.layers[layer].forward(x.to(backend.device, non_blocking=True))
                else:
                    if crossing:  # the hidden state moves to this device's static buffer
                        graphs.x.copy_(previous_graphs.x, non_blocking=True)
                    graphs.non_expert(layer)
                router_done = backend.record_compute()
            plan = self.layer_plan(step, layer, probs[:, layer], experts[layer], router_done)
            tokens = None if expert_tokens is None else expert_tokens[layer]

            gpu_experts, tokens, cpu_experts, cpu_tokens = split_cpu(plan, experts[layer], tokens, policy, layer,
                                                                     self.recorder)
            # With graphs the hidden state lives in the graphs' static buffers; CPU experts run between.
            x_now, y_now = (x, y) if graphs is None else (graphs.x, graphs.y)
            if cpu_experts:  # on a host thread, while the GPU's experts run
                cpu_work = self.cpu.start(y_now, [(machine.host.block((layer, e, 0), self._part_bytes[layer]),
                                                   min(t, y_now.shape[0])) for e, t in zip(cpu_experts, cpu_tokens)])
                self.recorder.activation_bytes += (2 * min(sum(cpu_tokens), y_now.shape[0]) * y_now.shape[1]
                                                   * y_now.element_size())

            def launch(i: int, weights: torch.Tensor, x=x_now, y=y_now, tokens=tokens) -> None:
                rows = 1 if tokens is None else min(tokens[i], x.shape[0])
                x[:rows] += machine.expert(y[:rows], weights)
            self.run_experts(layer, gpu_experts, plan,
                             launch if graphs is None else lambda _i, weights, graphs=graphs: graphs.expert(weights))
            if cpu_experts:
                out = cpu_work.result()
                if self.timeline is not None:  # the FFN's own time on the worker, `expert` holding how many
                    self.timeline.span(self.next_step - 1, layer, "cpu", len(cpu_experts), *self.cpu.last_span)
                with backend.on_compute():  # a blocking copy up: the pinned buffer is reused next layer
                    x_now[:out.shape[0]] += out.to(x_now.device)
        self.step_ended(step, backend.record_compute())

    def step_ended(self, step: Step, token_out: Event = DONE) -> None:
        """Once the pass's last kernel has completed (the token is out), the policy is told."""
        self.wait(token_out)
        super().step_ended(step)

    def layer_plan(self, step: Step, layer: int, probs: np.ndarray, experts: tuple[int, ...],
                   router_done: Event = DONE) -> PrefetchPlan | None:
        """Once the router's output has reached the host (router_done), the policy decides the layer."""
        self.wait(router_done)
        with self._host_timed(layer, "policy"):
            return self.calls.on_layer_start(step, layer, probs, experts)

    def run_experts(self, layer: int, experts: tuple[int, ...], plan: PrefetchPlan | None,
                    launch: Callable[[int, torch.Tensor], None]) -> None:
        """Run one layer's experts, each as soon as its blocks are resident: launch(i, weights) puts
        the compute of expert i (or of one of its parts) on the compute stream."""
        gpu = self.topology.layer_gpu[layer]
        cache, copies, backend = self.caches[gpu], self.copies[gpu], self.machine.backends[gpu]
        with self._host_timed(layer, "start_layer"):
            blocks, order = self.calls.start_layer(layer, experts, [gpu] * len(experts),
                                                   len(self.part_fractions[layer]), self.caches, self.links,
                                                   self.recorder, self.policy, self.model.bytes_per_expert, plan,
                                                   self.model.num_layers, self.topology.home)
        computed: list[Block] = []
        routed, launched, stall = len(experts), False, 0.0  # blocks past `routed`: a whole-layer gather
        for i in order:
            for b in blocks[i]:
                if not cache.is_resident(b):
                    if launched:
                        finished = backend.record_compute()
                        self.wait(finished)
                        self._unpin(gpu, computed, finished)
                        launched = False
                    if not cache.is_resident(b):
                        waited_from = self.now()
                        self._wait_block(copies, b)
                        stall += self.now() - waited_from
                        if self.timeline is not None:
                            self.timeline.wait(self.next_step - 1, layer, self._t0 + waited_from,
                                               time.perf_counter())
                if i < routed:
                    cache.mark_used(b)
                    if cache.pool.moved is not None:  # blocks slid down to make room: read them after
                        backend.compute_waits_for(cache.pool.moved)
                        cache.pool.moved = None
                    with backend.on_compute(), self._timed(backend, layer, "expert", i):
                        launch(i, expert_weights(cache.pool.view(b)))
                    launched = True
                computed.append(b)
        if computed:
            # No wait here: the next copy into these slots waits for this event on the GPU instead.
            self._unpin(gpu, computed, backend.record_compute())
        self.recorder.stall_s[layer] += stall

    def _unpin(self, gpu: int, blocks: list[Block], read_done: Event) -> None:
        cache, link = self.caches[gpu], self.links[gpu]
        if read_done is not DONE:
            cache.pool.read_by(blocks, read_done)
        for b in blocks:
            cache.unpin(b)
        blocks.clear()
        if link.blocked:
            link.kick()
