"""The SimPy model of offloaded MoE inference: requests, batches, forward passes, layers, experts, copies.

Requests arrive (closed loop with C clients, a Poisson process, or the trace's timestamps) and wait.
A server runs forward passes one after another, vLLM-style: while a request waits and the running
batch has room, the next request starts with its prefill pass (alone); otherwise one decode pass
runs for every running request together (continuous batching, at most max_batch requests), and
needs at each layer the union of their experts. Each layer costs its non-expert time (attention,
router) on its GPU, plus the transfer of the hidden state when the previous layer ran on another
GPU; then the router's output is known, the policy is told, the layer's experts are pinned, missing
ones are copied on demand into their GPU's cache, and each GPU runs its experts one after another,
each as soon as it is resident.

Time is simulated; the result depends only on the trace, the policy, the profiles and the seed.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import simpy

from policies.base import Block, Policy, PolicyContext, PrefetchPlan, Timing
from sim.compute import ComputeModel
from sim.copy_scheduler import CopyScheduler
from sim.errors import ConfigError, StallError
from sim.disk import HostTier
from sim.host_thread import HostThread
from sim.layer_protocol import HostObserver, split_cpu
from sim.link import HostFabric, HostLink
from sim.metrics import Recorder
from sim.placement import Placement, PlacedCache, fragments
from sim.profiles import HardwareProfile
from sim.replay import (RunState, Serving, SimOptions, arrival_times, bind_policy, cache_capacities,
                        check_options, check_room, initial_blocks, pass_step, part_bytes, policy_future,
                        policy_host_time, warm)
from sim.schedule import Pass
from sim.topology import Topology
from traces import ModelSpec, Trace


class Simulation(Serving):
    def __init__(self, trace: Trace, policy: Policy, model: ModelSpec, hardware: HardwareProfile, budget_bytes: int,
                 requests: list[int], options: SimOptions | None = None,
                 on_request_done: Callable[[int], None] | None = None, observer: HostObserver | None = None):
        """observer: told the duration of every host call (sim.layer_protocol.HostCalls)."""
        opts = self.options = options or SimOptions()
        check_options(opts, policy)
        self.trace = trace
        self.policy = policy
        self.model = model
        self.hardware = hardware
        self.requests = list(requests)
        self.topology = topo = Topology.build(hardware, model, opts.gpus, opts.placement)
        self.env = simpy.Environment()
        self.recorder = Recorder(model.num_layers)
        self.compute = ComputeModel(hardware, model)
        if policy.uses_cpu and hardware.cpu is None:
            raise ConfigError(f"policy '{policy.name}' computes experts on the host CPU, and hardware "
                              f"'{hardware.name}' has no cpu section; use a profile with one (e.g. h200-measured)")
        self.tier = None if opts.host_budget_bytes is None else HostTier(
            _disk_of(hardware), opts.host_budget_bytes, model.bytes_per_expert, model.num_layers, model.num_experts)
        self._part_fractions: list[tuple[float, ...]] = [(1.0,)] * model.num_layers
        self._part_bytes: list[list[int]] = [[model.bytes_per_expert]] * model.num_layers
        capacities = cache_capacities(policy, model, topo, budget_bytes, opts.budget_scope)
        self.policy_host = policy_host_time(hardware, policy, model, capacities)
        self.caches = [PlacedCache(capacity, self._block_bytes) for capacity in capacities]
        host_limited = hardware.host_aggregate_Bps is not None and \
            hardware.host_aggregate_Bps < topo.num_gpus * hardware.host_link.bandwidth_Bps
        fabric = HostFabric(self.env, hardware.host_aggregate_Bps) if host_limited else None
        peer_faster = HostLink.peer_faster(hardware)
        self.links: list[CopyScheduler] = []  # each GPU's copies; `transports` move their bytes
        self.links.extend(CopyScheduler(g, self.caches, policy, self.recorder, topo.peers[g], peer_faster, self.links)
                          for g in range(topo.num_gpus))
        self.serving_state(arrival_times(opts, trace, self.requests), on_request_done, observer)
        # The host thread is modelled only where landings cost it time: else every result stays as it was.
        self.host = HostThread(self.env, self.policy_host.land_s) if self.policy_host.land_s else None
        self.transports = [HostLink(self.env, link, hardware, fabric, self.compute, self.tier, self.calls.chunk_landed,
                                    self.host) for link in self.links]
        self.activation_bytes_per_token = model.hidden_size * model.bytes_per_param
        self._wake: simpy.Event | None = None

    def _block_bytes(self, block: Block) -> int:
        return self._part_bytes[block[0]][block[2]]

    def prepare(self, train_requests: list[int]) -> None:
        """Bind the policy, let it learn from the training split, fix expert splits, warm the caches."""
        topo = self.topology
        cpu = self.hardware.cpu is not None
        timing = Timing(self.hardware.host_link.copy_time, self.compute.expert_time, self.compute.non_expert_time,
                        self.compute.cpu_expert_time if cpu else None,
                        (lambda tokens: sum(self.compute.activation_time(tokens))) if cpu else None)
        ctx = PolicyContext(self.model, self.caches, topo.home, topo.layers_of,
                            np.random.default_rng(self.options.seed), policy_future(self.policy, self.trace, self.requests),
                            timing)
        self._part_fractions = bind_policy(self.policy, ctx, self.trace, train_requests)
        self._part_bytes = [part_bytes(self.model, f) for f in self._part_fractions]
        check_room(self.policy, self.caches, self._part_bytes, self.options.budget_scope)
        sizes = {n for parts in self._part_bytes for n in parts}
        placed = fragments(sizes)  # unequal blocks: where they sit decides when blocks must slide
        for gpu, cache in enumerate(self.caches):
            if placed:
                cache.pool = Placement(cache.capacity_bytes, sizes)
            warm(cache, self.policy, initial_blocks(self.policy, ctx, gpu, self._part_fractions, self.options.warm_start))

    def run(self) -> RunState:
        self.env.process(self._serve())
        if self._arrivals is None:
            for _ in range(min(self.options.clients, len(self.requests))):
                self._arrive()
        else:
            self.env.process(self._open_arrivals())
        self.env.run()
        if self.tier is not None:
            self.recorder.tier = self.tier.summary()
        if self._done < len(self.requests):
            raise StallError(f"the simulation stopped at t={self.env.now:.6g}s with {self._done} of "
                             f"{len(self.requests)} requests served (step {self.next_step}): "
                             f"{'; '.join(link.describe_wait() for link in self.links)}. Nothing was left to "
                             "happen, so the metrics would be partial; this is a bug in the engine or the policy")
        return RunState(self.recorder, self.caches, self.env.now)

    # --- requests ---
    def _open_arrivals(self):
        for when in self._arrivals:
            if when > self.env.now:
                yield self.env.timeout(when - self.env.now)
            self._arrive()

    def now(self) -> float:
        return self.env.now

    def _apply(self, plan: PrefetchPlan | None) -> None:
        self.calls.apply_plan(plan, self.policy, self.model.num_layers, self.links, self.topology.home)

    def _woken(self) -> None:
        if self._wake is not None and not self._wake.triggered:
            self._wake.succeed()

    def _serve(self):
        for spec in self.serving_loop():
            if spec is not None:
                yield from self._pass(spec)
            else:  # asleep until a request arrives
                self._wake = self.env.event()
                yield self._wake
                self._wake = None

    # --- forward passes ---
    def _advance(self, seconds: float):
        """Let `seconds` of GPU work pass. When no other event is due before it ends, move the clock
        directly instead of scheduling a timeout: same timeline, a fraction of SimPy's cost. (An
        event due at exactly that instant still goes through SimPy, to keep same-time ordering.)"""
        env = self.env
        until = env._now + seconds
        if env.peek() > until:
            env._now = until
        else:
            yield env.timeout(seconds)

    def _pass(self, spec: Pass):
        step = pass_step(self.next_step, spec, self.trace)
        on_layer_start, advance, run_experts, run = self.calls.on_layer_start, self._advance, self._run_experts, \
            self.compute.run
        host = self.policy_host
        self.step_started(step)
        if host.step_s:
            yield from advance(host.step_s if self.host is None else self.host.take(host.step_s))
        non_expert = self.compute.non_expert_time(spec.tokens)
        probs, experts, expert_tokens = spec.probs, spec.experts, spec.expert_tokens
        layer_gpu = self.topology.layer_gpu
        hidden_bytes = spec.tokens * self.activation_bytes_per_token
        for layer in range(self.model.num_layers):
            if layer and layer_gpu[layer] != layer_gpu[layer - 1]:
                yield from advance(self.topology.transfer_time(self.hardware, layer_gpu[layer - 1], layer_gpu[layer],
                                                               hidden_bytes))
            yield from advance(run(layer_gpu[layer], self.env.now, non_expert))
            if self.host is not None and self.host.free_in():  # the host is handling a landing
                yield from advance(self.host.free_in())
            plan = on_layer_start(step, layer, probs[:, layer], experts[layer])
            if host.layer_s:  # the policy decided on the host; its fetches go out after
                yield from advance(host.layer_s if self.host is None else self.host.take(host.layer_s))
            tokens = None if expert_tokens is None else expert_tokens[layer]
            if plan is not None and plan.cpu:
                yield from self._hybrid(layer, experts[layer], tokens, plan, spec.tokens)
            else:
                yield from run_experts(layer, experts[layer], tokens, plan)
        self.step_ended(step)

    def _hybrid(self, layer: int, experts: tuple[int, ...], tokens: list[int] | None, plan: PrefetchPlan,
                pass_tokens: int):
        """A layer whose policy sent some experts to the host CPU: the GPU computes the others
        meanwhile, and the layer ends when both have."""
        gpu_experts, gpu_tokens, cpu_experts, cpu_tokens = split_cpu(plan, experts, tokens, self.policy, layer,
                                                                     self.recorder)
        host_free = self.env.event()  # the GPU side has waited for its last copy
        cpu = self.env.process(self._on_cpu(layer, cpu_experts, cpu_tokens, pass_tokens, host_free))
        yield from self._run_experts(layer, gpu_experts, gpu_tokens, plan, host_free)
        if cpu.is_alive:
            yield cpu

    def _on_cpu(self, layer: int, experts: list[int], tokens: list[int], pass_tokens: int, host_free: simpy.Event):
        """The hidden state of the tokens routed to CPU experts goes down the host link, the CPU
        runs those experts one after another (each on all its cores; weights read from host RAM,
        or from the drive first where the disk tier is on), their combined output comes up. The two
        small copies are not queued behind the weight copies (they take microseconds).
        An expert started while the GPU side still waits for copies (the host thread spinning) costs
        the CPU's spinning table, one started after it the other (sim.host_cpu), decided at each
        expert's start. On H200s, n_cpu_moe (which copies nothing) went from 83-87% too slow with
        one table to -13% on Mixtral and within 5% on gpt-oss (docs/realrun/h200-*-cpu*.md)."""
        rows = min(pass_tokens, sum(tokens))
        down, up = self.compute.activation_time(rows)
        self.recorder.activation_bytes += 2 * rows * self.activation_bytes_per_token
        yield self.env.timeout(down)
        for e, t in zip(experts, tokens):
            if self.tier is not None:
                wait = self.tier.read(layer, e, self.env.now)
                if wait:
                    yield self.env.timeout(wait)
            seconds = self.compute.cpu_expert_time(t, spinning=not host_free.triggered)
            self.recorder.cpu_busy_s += seconds
            yield self.env.timeout(seconds)
        yield self.env.timeout(up)

    def _run_experts(self, layer: int, experts: tuple[int, ...], tokens: list[int] | None, plan: PrefetchPlan | None,
                     host_free: simpy.Event | None = None):
        """Run one layer's experts; tokens[i] is how many tokens expert i serves (None: one each).
        `host_free`, when given, succeeds once every GPU has waited for its last block."""
        topo = self.topology
        homes, blocks, order = self._start_layer(layer, experts, plan)
        routed = len(experts)
        if topo.placement == "layers":
            yield from self._compute_on(homes[0] if homes else topo.layer_gpu[layer], layer, order, blocks, tokens,
                                        routed, dispatch=False, resident=host_free)
            return
        gpus = sorted(set(homes))
        # Expert-parallel: each GPU runs its share of the layer's experts at the same time.
        resident = [self.env.event() for _ in gpus] if host_free is not None else [None] * len(gpus)
        work = [self.env.process(self._compute_on(g, layer, [i for i in order if homes[i] == g], blocks, tokens,
                                                  routed, dispatch=True, resident=r)) for g, r in zip(gpus, resident)]
        if host_free is not None:
            self.env.all_of(resident).callbacks.append(lambda _event: host_free.succeed())
        yield self.env.all_of(work)

    def _start_layer(self, layer: int, experts: tuple[int, ...], plan: PrefetchPlan | None):
        """The host's part of a layer (sim.layer_protocol.start_layer): classify, pin, queue copies.
        Returns (GPU per expert, blocks per expert, compute order)."""
        topo = self.topology
        if topo.placement == "layers":
            homes = [topo.layer_gpu[layer]] * len(experts)
        else:
            homes = [topo.home(layer, e) for e in experts]
        blocks, order = self.calls.start_layer(layer, experts, homes, len(self._part_fractions[layer]), self.caches,
                                               self.links, self.recorder, self.policy, self.model.bytes_per_expert,
                                               plan, self.model.num_layers, topo.home)
        return homes, blocks, order

    def _compute_on(self, gpu: int, layer: int, order: list[int], blocks: list[list[Block]], tokens: list[int] | None,
                    routed: int, dispatch: bool, resident: simpy.Event | None = None):
        """One GPU computes its experts of a layer in order, each once its blocks are resident (the
        first `routed` entries of `blocks`; later ones, a whole-layer gather, are only waited for);
        `resident` succeeds once the last of them is."""
        env, cache, link, rec = self.env, self.caches[gpu], self.transports[gpu], self.recorder
        fractions = self._part_fractions[layer]
        hidden = self.topology.layer_gpu[layer]
        remote = dispatch and gpu != hidden
        if remote:  # tokens travel to this GPU's experts and back
            order_routed = [i for i in order if i < routed]
            moved = (len(order_routed) if tokens is None else sum(tokens[i] for i in order_routed)) \
                * self.activation_bytes_per_token
            yield from self._advance(self.topology.transfer_time(self.hardware, hidden, gpu, moved))
        busy = 0.0
        computed: list[Block] = []
        stall = 0.0
        expert_time = self.compute.expert_time
        for i in order:
            seconds = 0.0 if i >= routed else expert_time(1 if tokens is None else tokens[i])
            for p, b in enumerate(blocks[i]):
                if not cache.is_resident(b):
                    if busy:
                        yield from self._advance(self.compute.run(gpu, env.now, busy, reads_experts=True))
                        busy = 0.0
                        self._unpin(gpu, computed)
                    if not cache.is_resident(b):
                        waited_from = env.now
                        yield link.ready(b)
                        stall += env.now - waited_from
                if i < routed:
                    cache.mark_used(b)
                busy += seconds * fractions[p]
                computed.append(b)
        if resident is not None:
            resident.succeed()
        if busy:
            yield from self._advance(self.compute.run(gpu, env.now, busy, reads_experts=True))
        self._unpin(gpu, computed)
        rec.stall_s[layer] += stall
        if remote:
            yield from self._advance(self.topology.transfer_time(self.hardware, gpu, hidden, moved))

    def _unpin(self, gpu: int, blocks: list[Block]) -> None:
        cache = self.caches[gpu]
        for b in blocks:
            cache.unpin(b)
        blocks.clear()
        if self.links[gpu].blocked:
            self.links[gpu].kick()


def _disk_of(hardware: HardwareProfile):
    if hardware.disk is None:
        raise ConfigError(f"host_budget is set and hardware '{hardware.name}' has no disk section; add one "
                          "(bandwidth_Bps, latency_s, queue_depth) or leave host_budget unset")
    return hardware.disk
