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

from policies.base import DEMAND_PRIORITY, Block, Policy, PolicyContext, PrefetchPlan, RequestInfo, Step
from sim.cache import ExpertCache
from sim.compute import ComputeModel
from sim.errors import ConfigError
from sim.future import ReplayFuture
from sim.link import HostLink
from sim.metrics import Recorder
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
        self._embeddings = trace.embedding()
        self._step_index = 0

    def _block_bytes(self, block: Block) -> int:
        return self._part_bytes[block[0]][block[2]]

    def prepare(self, train_requests: list[int]) -> None:
        """Bind the policy, let it learn from the training split, fix expert splits, warm the cache."""
        future = ReplayFuture(self.trace, self.requests) if self.policy.reads_future else None
        ctx = PolicyContext(self.model, [self.cache], self.gpu_of_layer, np.random.default_rng(self.options.seed), future)
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
            offset, prefill, decode = trace.rows(r)
            rows = slice(offset, offset + prefill + decode)
            probs = trace.probs(rows)  # [iterations, layers, experts], float32
            experts = trace.experts[rows].tolist()
            first_token = None
            last_token = start
            counts = trace.prefill_counts[r]
            if prefill or counts.any():
                prefill_probs = probs[:prefill] if prefill else (counts / counts.sum(axis=1, keepdims=True))[None]
                yield from self._prefill(r, prefill_probs, counts, info.prompt_tokens)
                first_token = last_token = env.now
            for i in range(prefill, prefill + decode):
                yield from self._decode(r, probs[i:i + 1], experts[i], i)
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
    def _new_step(self, kind: str, r: int, tokens: int, lookahead_rows: slice | None) -> Step:
        lookahead = None
        if lookahead_rows is not None and self.trace.lookahead is not None:
            table = self.trace.lookahead

            def lookahead(layer: int, rows=lookahead_rows):
                return np.asarray(table[rows, layer], dtype=np.float32)
        step = Step(self._step_index, kind, (r,), np.zeros(tokens, dtype=np.intp), lookahead)
        self._step_index += 1
        self.recorder.steps += 1
        return step

    def _prefill(self, r: int, probs: np.ndarray, counts: np.ndarray, prompt_tokens: int):
        offset, prefill, _ = self.trace.rows(r)
        step = self._new_step("prefill", r, len(probs), slice(offset, offset + prefill) if prefill else None)
        self._apply(self.policy.on_step_start(step))
        non_expert = self.compute.non_expert_time(max(prompt_tokens, 1))
        for layer in range(self.model.num_layers):
            yield self.env.timeout(non_expert)
            needed = np.flatnonzero(counts[layer])
            experts = tuple(int(e) for e in needed)
            tokens = [int(counts[layer, e]) for e in needed]
            self._apply(self.policy.on_layer_start(step, layer, probs[:, layer], experts))
            yield from self._run_experts(layer, experts, tokens)
        self.policy.on_step_end(step)

    def _decode(self, r: int, probs: np.ndarray, experts: list[list[int]], row: int):
        step = self._new_step("decode", r, 1, slice(self.trace.iter_offset[r] + row, self.trace.iter_offset[r] + row + 1))
        self._apply(self.policy.on_step_start(step))
        non_expert = self.compute.non_expert_time(1)
        timeout, policy = self.env.timeout, self.policy
        for layer in range(self.model.num_layers):
            yield timeout(non_expert)
            chosen = tuple(experts[layer])
            self._apply(policy.on_layer_start(step, layer, probs[:, layer], chosen))
            yield from self._run_experts(layer, chosen, None)
        policy.on_step_end(step)

    def _apply(self, plan: PrefetchPlan | None) -> None:
        if plan is None:
            return
        if plan.replace:
            self.link.cancel_prefetches()
        layers = self.model.num_layers
        for block, priority in plan.blocks:
            if not 0 <= block[0] < layers or priority == DEMAND_PRIORITY:
                raise ConfigError(f"policy '{self.policy.name}' asked to prefetch {block} at priority {priority}: "
                                  "out of range, or at demand priority")
            self.link.fetch(block, priority)

    def _run_experts(self, layer: int, experts: tuple[int, ...], tokens: list[int] | None):
        """Run one layer's experts; tokens[i] is how many tokens expert i serves (None: one each)."""
        env, cache, link, rec = self.env, self.cache, self.link, self.recorder
        fractions = self._part_fractions[layer]
        nparts = len(fractions)
        blocks = [[(layer, e, p) for p in range(nparts)] for e in experts]
        rank = []
        for expert_blocks in blocks:
            if all(cache.is_resident(b) for b in expert_blocks):
                rec.hits[layer] += 1
                if any(b in cache.unused_prefetched for b in expert_blocks):
                    rec.prefetch_hits[layer] += 1
                rank.append(0)
            elif any(link.is_pending(b) or cache.is_in_flight(b) for b in expert_blocks):
                rec.late[layer] += 1
                rank.append(1)
            else:
                rec.misses[layer] += 1
                rank.append(2)
            for b in expert_blocks:
                cache.pin(b)
        rec.uses[layer] += len(experts)
        rec.layer_iterations += 1

        order = range(len(experts))
        needed_bytes = len(experts) * self.model.bytes_per_expert
        if self.policy.compute_order == "availability" or needed_bytes > cache.capacity_bytes:
            # Resident first, then in flight, then missing: overlaps compute with copies, and can
            # never wait on a copy that needs memory held by a later expert of the same layer.
            order = sorted(order, key=rank.__getitem__)
        for i in order:
            for b in blocks[i]:
                if not cache.is_resident(b):
                    link.fetch(b, DEMAND_PRIORITY)

        busy = 0.0
        computed: list[Block] = []
        stall = 0.0
        for i in order:
            seconds = self.compute.expert_time(1 if tokens is None else tokens[i])
            for p, b in enumerate(blocks[i]):
                if not cache.is_resident(b):
                    if busy:
                        yield env.timeout(busy)
                        busy = 0.0
                        self._unpin(computed)
                    if not cache.is_resident(b):
                        waited_from = env.now
                        yield link.ready(b)
                        stall += env.now - waited_from
                cache.mark_used(b)
                busy += seconds * fractions[p]
                computed.append(b)
        if busy:
            yield env.timeout(busy)
        self._unpin(computed)
        rec.stall_s[layer] += stall

    def _unpin(self, blocks: list[Block]) -> None:
        for b in blocks:
            self.cache.unpin(b)
        blocks.clear()
        if self.link.blocked:
            self.link.kick()
