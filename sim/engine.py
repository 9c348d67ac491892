"""The SimPy model of offloaded MoE inference: requests, forward passes, layers, experts, copies.

One server process runs the requests one after another (closed loop by default, or at Poisson /
trace arrival times), each as a prefill pass (when the trace records one) and then one decode pass
per output token. Each layer costs its non-expert time (attention, router); then the router's
output is known, the policy is told, the layer's experts are pinned, missing ones are copied on
demand, and the experts run one after another, each as soon as it is resident.

Time is simulated; the result depends only on the trace, the policy, the profiles and the seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import simpy

from policies.base import Block, Policy, PolicyContext, PrefetchPlan, RequestInfo, Step, Timing
from sim.cache import ExpertCache
from sim.layer_protocol import apply_plan, start_layer
from sim.compute import ComputeModel
from sim.errors import ConfigError
from sim.future import ReplayFuture
from sim.link import HostLink
from sim.metrics import Recorder
from sim.schedule import Pass, request_passes
from sim.profiles import HardwareProfile
from traces import ModelSpec, Trace

ARRIVALS = ("closed", "poisson", "trace")


@dataclass
class SimOptions:
    warm_start: bool = False
    arrival: str = "closed"  # closed: next request when the last ends; poisson: rate_rps; trace: arrival_s
    rate_rps: float = 1.0
    seed: int = 0


@dataclass
class RunState:
    """Everything a finished run leaves for the summary."""

    recorder: Recorder
    caches: list[ExpertCache]
    makespan_s: float


class Simulation:
    def __init__(self, trace: Trace, policy: Policy, model: ModelSpec, hardware: HardwareProfile, budget_bytes: int,
                 requests: list[int], options: SimOptions | None = None,
                 on_request_done: Callable[[int], None] | None = None):
        self.options = options or SimOptions()
        if self.options.arrival not in ARRIVALS:
            raise ConfigError(f"arrival '{self.options.arrival}' unknown; use one of {', '.join(ARRIVALS)}")
        self.trace = trace
        self.policy = policy
        self.model = model
        self.requests = list(requests)
        self.on_request_done = on_request_done
        self.env = simpy.Environment()
        self.recorder = Recorder(model.num_layers)
        self.compute = ComputeModel(hardware, model)
        self.gpu_of_layer = [0] * model.num_layers
        self._part_fractions: list[tuple[float, ...]] = [(1.0,)] * model.num_layers
        self._part_bytes: list[list[int]] = [[model.bytes_per_expert]] * model.num_layers
        capacity = model.total_expert_bytes if policy.ignores_budget else budget_bytes
        self.cache = ExpertCache(capacity, self._block_bytes)
        self.link = HostLink(self.env, self.cache, policy, hardware.host_link, self.recorder)
        self.timing = Timing(hardware.host_link.copy_time, self.compute.expert_time, self.compute.non_expert_time)
        self._embeddings = trace.embedding(policy.embedding_source())
        self._step_index = 0

    def _block_bytes(self, block: Block) -> int:
        return self._part_bytes[block[0]][block[2]]

    def prepare(self, train_requests: list[int]) -> None:
        """Bind the policy, let it learn from the training split, fix expert splits, warm the cache."""
        future = ReplayFuture(self.trace, self.requests) if self.policy.reads_future else None
        ctx = PolicyContext(self.model, [self.cache], self.gpu_of_layer, np.random.default_rng(self.options.seed), future,
                            self.timing)
        self.policy.bind(ctx)
        if train_requests:
            self.policy.fit(self.trace, train_requests)
        for layer in range(self.model.num_layers):
            fractions = tuple(self.policy.parts(layer))
            if abs(sum(fractions) - 1.0) > 1e-9 or any(f <= 0 for f in fractions):
                raise ConfigError(f"policy '{self.policy.name}' splits layer {layer} experts into {fractions}; "
                                  "parts must be positive and sum to 1")
            self._part_fractions[layer] = fractions
            self._part_bytes[layer] = [int(round(self.model.bytes_per_expert * f)) for f in fractions]
        layers = range(self.model.num_layers)
        if self.policy.ignores_budget:
            self._warm([(l, e, p) for l in layers for e in range(self.model.num_experts)
                        for p in range(len(self._part_fractions[l]))])
        elif self.options.warm_start:
            self._warm(self.policy.warm_blocks(self.cache, layers))

    def _warm(self, blocks: list[Block]) -> None:
        """Place blocks before the first request, through the policy's admission; no copy is charged."""
        for block in blocks:
            if not self.cache.holds(block) and self.cache.admit(block, self.policy, demand=False):
                self.cache.reserve(block)
                self.cache.commit(block, prefetched=False)
                self.policy.on_copy_done(block, False)

    def run(self) -> RunState:
        self.env.process(self._serve())
        self.env.run()
        return RunState(self.recorder, [self.cache], self.env.now)

    # --- requests ---
    def _arrival_times(self) -> np.ndarray | None:
        opts = self.options
        if opts.arrival == "closed":
            return None
        if opts.arrival == "poisson":
            if opts.rate_rps <= 0:
                raise ConfigError(f"rate_rps must be positive for Poisson arrivals, got {opts.rate_rps}")
            gaps = np.random.default_rng(opts.seed).exponential(1.0 / opts.rate_rps, len(self.requests))
            return np.concatenate([[0.0], np.cumsum(gaps[:-1])])
        times = self.trace.requests["arrival_s"].to_numpy()[self.requests]
        if np.isnan(times).any():
            raise ConfigError("arrival=trace, but the trace has requests without arrival_s; use closed or poisson")
        return times - times.min()

    def _request_info(self, r: int) -> RequestInfo:
        row = self.trace.requests.iloc[r]
        embedding = None
        if self._embeddings is not None and not np.isnan(self._embeddings[r]).any():
            embedding = np.asarray(self._embeddings[r])
        return RequestInfo(r, str(row["request_id"]), int(row["prompt_tokens"]), int(row["output_tokens"]), embedding)

    def _serve(self):
        env, policy, trace = self.env, self.policy, self.trace
        arrivals = self._arrival_times()
        for position, r in enumerate(self.requests):
            if arrivals is not None and arrivals[position] > env.now:
                yield env.timeout(arrivals[position] - env.now)
            arrival = env.now if arrivals is None else float(arrivals[position])
            start = env.now
            info = self._request_info(r)
            self._apply(policy.on_request_start(info))
            first_token = None
            last_token = start
            for spec in request_passes(trace, r):
                yield from self._pass(spec)
                if first_token is None:
                    first_token = env.now
                else:
                    self.recorder.token_latencies.append(env.now - last_token)
                last_token = env.now
            policy.on_request_end(info)
            self.recorder.requests.append({
                "request_id": info.request_id, "prompt_tokens": info.prompt_tokens,
                "output_tokens": info.output_tokens, "arrival_s": arrival, "start_s": start,
                "first_token_s": first_token if first_token is not None else env.now, "end_s": env.now,
            })
            if self.on_request_done is not None:
                self.on_request_done(r)

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
        step = Step(self._step_index, spec.kind, (spec.request,), np.zeros(len(spec.probs), dtype=np.intp),
                    self._rows_view(self.trace.lookahead, spec.rows), self._rows_view(self.trace.hidden_proj, spec.rows))
        self._step_index += 1
        self.recorder.steps += 1
        policy, advance, run_experts, apply = self.policy, self._advance, self._run_experts, self._apply
        apply(policy.on_step_start(step))
        non_expert = self.compute.non_expert_time(spec.tokens)
        probs, experts, expert_tokens = spec.probs, spec.experts, spec.expert_tokens
        for layer in range(self.model.num_layers):
            yield from advance(non_expert)
            plan = policy.on_layer_start(step, layer, probs[:, layer], experts[layer])
            yield from run_experts(layer, experts[layer], None if expert_tokens is None else expert_tokens[layer], plan)
        policy.on_step_end(step)

    @staticmethod
    def _rows_view(table: np.ndarray | None, rows: slice | None) -> Callable[[int], np.ndarray] | None:
        """layer -> this pass's rows of an optional per-iteration table (lookahead gates, hidden states)."""
        if table is None or rows is None:
            return None
        return lambda layer: np.asarray(table[rows, layer], dtype=np.float32)

    def _apply(self, plan: PrefetchPlan | None) -> None:
        apply_plan(plan, self.policy, self.model.num_layers, self._link_of_layer)

    def _link_of_layer(self, layer: int) -> HostLink:
        return self.link

    def _run_experts(self, layer: int, experts: tuple[int, ...], tokens: list[int] | None, plan: PrefetchPlan | None):
        """Run one layer's experts; tokens[i] is how many tokens expert i serves (None: one each)."""
        env, cache, link, rec = self.env, self.cache, self.link, self.recorder
        fractions = self._part_fractions[layer]
        nparts = len(fractions)
        blocks, order = start_layer(layer, experts, nparts, cache, link, rec, self.policy, self.model.bytes_per_expert,
                                    plan, self.model.num_layers, self._link_of_layer)
        busy = 0.0
        computed: list[Block] = []
        stall = 0.0
        expert_time = self.compute.expert_time
        routed = len(experts)
        for i in order:
            seconds = 0.0 if i >= routed else expert_time(1 if tokens is None else tokens[i])
            for p, b in enumerate(blocks[i]):
                if not cache.is_resident(b):
                    if busy:
                        yield from self._advance(busy)
                        busy = 0.0
                        self._unpin(computed)
                    if not cache.is_resident(b):
                        waited_from = env.now
                        yield link.ready(b)
                        stall += env.now - waited_from
                if i < routed:
                    cache.mark_used(b)
                busy += seconds * fractions[p]
                computed.append(b)
        if busy:
            yield from self._advance(busy)
        self._unpin(computed)
        rec.stall_s[layer] += stall

    def _unpin(self, blocks: list[Block]) -> None:
        for b in blocks:
            self.cache.unpin(b)
        blocks.clear()
        if self.link.blocked:
            self.link.kick()
