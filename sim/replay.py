"""The engine-neutral outer half of a replay, shared by the simulator and realrun's executor.

How requests are served (SimOptions) and what a run leaves (RunState); binding the policy (with
the future for the oracles), fixing how experts are split into blocks, warming the caches, the
requests' arrival times; the serving loop with the policy's request and pass hooks (Serving), and
each request's timing record (TTFT, the gaps between tokens, end-to-end). An engine supplies the
clock and runs the passes (sim.engine in simulated time, realrun.executor on devices, sim.fast
without SimPy); the records are identical.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from policies.base import Block, Policy, PolicyContext, RequestInfo, Step, known_probs
from sim.cache import ExpertCache
from sim.errors import ConfigError
from sim.future import ReplayFuture
from sim.layer_protocol import HostCalls, HostObserver
from sim.metrics import Recorder
from sim.profiles import HardwareProfile, PolicyHostTime
from sim.schedule import Pass, merge_decode, request_passes
from traces import ModelSpec, Trace


BUDGET_SCOPES = ("per_gpu", "total")


@dataclass
class SimOptions:
    """How requests are served, whichever engine serves them."""

    warm_start: bool = False
    arrival: str = "closed"  # closed: C clients, each sends its next request when the last ends
    clients: int = 1
    rate_rps: float = 1.0  # poisson
    max_batch: int = 1  # decode batch cap
    gpus: int | None = None  # None: the hardware profile's count
    placement: str = "layers"  # layers | experts | round_robin
    budget_scope: str = "per_gpu"  # the budget is per GPU, or the total over all GPUs
    host_budget_bytes: int | None = None  # host RAM for experts over the profile's disk; None: no disk tier
    seed: int = 0


@dataclass
class RunState:
    """Everything a finished run leaves for the summary."""

    recorder: Recorder
    caches: list[ExpertCache]
    makespan_s: float


def check_options(options, policy: Policy) -> None:
    """Serving options every engine refuses alike (options: budget_scope, max_batch, clients, arrival)."""
    if options.budget_scope not in BUDGET_SCOPES:
        raise ConfigError(f"budget_scope '{options.budget_scope}' unknown; use {' or '.join(BUDGET_SCOPES)}")
    if options.max_batch < 1 or options.clients < 1:
        raise ConfigError(f"max_batch ({options.max_batch}) and clients ({options.clients}) must be at least 1")
    if policy.reads_future and (options.max_batch > 1 or (options.arrival == "closed" and options.clients > 1)):
        raise ConfigError(f"policy '{policy.name}' reads the future, which is defined on one request at a "
                          "time: use max_batch=1 and clients=1")


def bind_policy(policy: Policy, ctx: PolicyContext, trace: Trace, train_requests: list[int]) -> list[tuple[float, ...]]:
    """Bind the policy, let it learn from the training split; returns each layer's part fractions."""
    policy.bind(ctx)
    if train_requests:
        policy.fit(trace, train_requests)
    fractions = []
    for layer in range(ctx.model.num_layers):
        parts = tuple(policy.parts(layer))
        if abs(sum(parts) - 1.0) > 1e-9 or any(f <= 0 for f in parts):
            raise ConfigError(f"policy '{policy.name}' splits layer {layer} experts into {parts}; "
                              "parts must be positive and sum to 1")
        fractions.append(parts)
    return fractions


def policy_future(policy: Policy, trace: Trace, requests: list[int]) -> ReplayFuture | None:
    """The replay's future, for the policies that may read it; None for the others."""
    return ReplayFuture(trace, requests) if policy.reads_future else None


def part_bytes(model: ModelSpec, fractions: tuple[float, ...]) -> list[int]:
    return [int(round(model.bytes_per_expert * f)) for f in fractions]


def cache_capacities(policy: Policy, model: ModelSpec, topology, budget_bytes: int, budget_scope: str) -> list[int]:
    """Each GPU's expert-cache bytes: the budget per GPU (or the total split evenly), or, for bounds
    that ignore the budget, every expert homed on that GPU."""
    if policy.ignores_budget:
        return [sum(model.bytes_per_expert for l in range(model.num_layers) for e in range(model.num_experts)
                    if topology.home(l, e) == gpu) for gpu in range(topology.num_gpus)]
    per_gpu = budget_bytes if budget_scope == "per_gpu" else budget_bytes // topology.num_gpus
    return [per_gpu] * topology.num_gpus


def policy_host_time(hardware: HardwareProfile, policy: Policy, model: ModelSpec, capacities: list[int]) -> PolicyHostTime:
    """The host time `policy`'s decisions are charged in a run whose GPUs hold `capacities` bytes of
    experts: the profile's, at that share of all the model's experts (PolicyHostTime.at)."""
    share = min(1.0, sum(capacities) / (model.num_layers * model.num_experts * model.bytes_per_expert))
    return hardware.policy_host_time(policy.name).at(share)


def check_room(policy: Policy, caches: list[ExpertCache], part_bytes: list[list[int]], budget_scope: str) -> None:
    """Refuse a cache too small for some block: no copy of it could ever start, and the replay
    would stop at its first use."""
    if policy.ignores_budget:
        return
    largest, layer = max(((n, l) for l, parts in enumerate(part_bytes) for n in parts), key=lambda t: (t[0], -t[1]))
    capacity = min(cache.capacity_bytes for cache in caches)
    if largest > capacity:
        gpus = len(caches)
        split = f" (budget_scope=total splits the budget over {gpus} GPUs)" if budget_scope == "total" else ""
        at_least = largest * gpus if budget_scope == "total" else largest
        raise ConfigError(f"the budget gives each GPU {capacity:,} bytes{split}, fewer than layer {layer}'s largest "
                          f"expert part ({largest:,} bytes), which could never be copied; raise the budget to at "
                          f"least {at_least:,} bytes")


def initial_blocks(policy: Policy, ctx: PolicyContext, gpu: int, fractions: list[tuple[float, ...]],
                   warm_start: bool) -> list[Block]:
    """What a GPU's cache holds before the first request: every expert homed there (bounds that
    ignore the budget), the policy's warm set (warm_start, or a static placement's), or nothing."""
    if policy.ignores_budget:
        return [(l, e, p) for l in ctx.layers_of(gpu) for e in range(ctx.model.num_experts)
                if ctx.home(l, e) == gpu for p in range(len(fractions[l]))]
    if warm_start or policy.preloads:
        return policy.warm_blocks(gpu)
    return []


def warm(cache: ExpertCache, policy: Policy, blocks: list[Block]) -> list[Block]:
    """Place blocks before the first request, through the policy's admission; no copy is charged.
    Returns the blocks placed (an engine that moves real bytes copies those)."""
    placed = []
    for block in blocks:
        if not cache.holds(block) and cache.admit(block, policy, demand=False):
            cache.reserve(block)
            cache.commit(block, prefetched=False)
            policy.on_copy_done(block, False)
            placed.append(block)
    cache.take_slid_bytes()  # placing them cost nothing either: no slide is charged to the first copy
    return placed


def arrival_times(options, trace: Trace, requests: list[int]) -> np.ndarray | None:
    """Arrival of each replayed request in seconds from the start (options: arrival, rate_rps, seed);
    None for a closed loop."""
    if options.arrival == "closed":
        return None
    if options.arrival == "poisson":
        if options.rate_rps <= 0:
            raise ConfigError(f"rate_rps must be positive for Poisson arrivals, got {options.rate_rps}")
        gaps = np.random.default_rng(options.seed).exponential(1.0 / options.rate_rps, len(requests))
        return np.concatenate([[0.0], np.cumsum(gaps[:-1])])
    if options.arrival != "trace":
        raise ConfigError(f"arrival '{options.arrival}' unknown; use closed, poisson or trace")
    times = trace.requests["arrival_s"].to_numpy()[requests]
    if np.isnan(times).any():
        raise ConfigError("arrival=trace, but the trace has requests without arrival_s; use closed or poisson")
    return times - times.min()


def request_info(trace: Trace, embeddings: np.ndarray | None, r: int) -> RequestInfo:
    row = trace.requests.iloc[r]
    embedding = None
    if embeddings is not None and not np.isnan(embeddings[r]).any():
        embedding = np.asarray(embeddings[r])
    return RequestInfo(r, str(row["request_id"]), int(row["prompt_tokens"]), int(row["output_tokens"]), embedding)


class RequestTimer:
    """One request's timing: call token(now) after each forward pass, finish(now) at its end."""

    def __init__(self, info: RequestInfo, arrival_s: float, start_s: float, recorder: Recorder):
        self.info = info
        self.arrival_s = arrival_s
        self.start_s = start_s
        self.recorder = recorder
        self.first_token_s: float | None = None
        self.last_token_s = start_s

    def token(self, now: float) -> None:
        if self.first_token_s is None:
            self.first_token_s = now
        else:
            self.recorder.token_latencies.append(now - self.last_token_s)
        self.last_token_s = now

    def finish(self, now: float) -> None:
        info = self.info
        self.recorder.requests.append({
            "request_id": info.request_id, "prompt_tokens": info.prompt_tokens,
            "output_tokens": info.output_tokens, "arrival_s": self.arrival_s, "start_s": self.start_s,
            "first_token_s": self.first_token_s if self.first_token_s is not None else now, "end_s": now,
        })


def pass_step(index: int, spec: Pass, trace: Trace) -> Step:
    """The policy's view of a forward pass (with the trace's lookahead gates and hidden-state
    projections where it has them)."""
    counts = spec.expert_tokens
    return Step(index, spec.kind, spec.requests, spec.token_request, _rows_view(trace.lookahead, spec.rows),
                _rows_view(trace.hidden_proj, spec.rows), None if counts is None else counts.__getitem__,
                _known_view(spec.probs))


def _known_view(probs: np.ndarray) -> Callable[[int], np.ndarray]:
    """layer -> known_probs of the pass's probabilities of that layer, estimated for every layer
    of the pass at the first call (known_probs works row by row)."""
    made: list[np.ndarray] = []

    def known(layer: int) -> np.ndarray:
        if not made:
            made.append(known_probs(probs))
        return made[0][:, layer]
    return known


def _rows_view(table: np.ndarray | None, rows) -> Callable[[int], np.ndarray] | None:
    """layer -> this pass's rows of an optional per-iteration table."""
    if table is None or rows is None:
        return None
    return lambda layer: np.asarray(table[rows, layer], dtype=np.float32)


@dataclass(eq=False)
class Active:
    """A request between arrival and completion."""

    index: int
    info: RequestInfo
    arrival: float
    timer: RequestTimer | None = None  # from its start
    passes: Iterator[Pass] | None = None
    next_pass: Pass | None = None


class Serving:
    """The request bookkeeping both engines share around their forward passes: arrivals, the start
    of a request (its prefill runs alone), tokens out after a pass, completion, and the policy's
    request and pass hooks around them. An engine provides now(), _apply(plan) and the state set up
    by serving_state(); it runs the passes serving_loop() yields, each between step_started() and
    step_ended()."""

    trace: Trace
    policy: Policy
    recorder: Recorder
    requests: list[int]

    def serving_state(self, arrivals: np.ndarray | None, on_request_done, observer: HostObserver | None = None) -> None:
        self._arrivals = arrivals  # None: closed loop
        self.calls = HostCalls(self.policy, observer)  # every policy hook and protocol call goes through here
        self.on_request_done = on_request_done
        trace = self.trace
        self._embeddings = None if trace is None else trace.embedding(self.policy.embedding_source(trace.embedding_names))
        self._waiting: deque[Active] = deque()
        self._running: list[Active] = []
        self._issued = 0
        self._done = 0
        self._step_index = 0

    def now(self) -> float:
        raise NotImplementedError

    def _apply(self, plan) -> None:
        raise NotImplementedError

    def _woken(self) -> None:
        """A request arrived (an engine whose server sleeps wakes it here)."""

    def _arrivals_due(self) -> None:
        """Before each decision of the serving loop (an engine whose arrivals are not events of its
        own delivers those due by now here)."""

    def serving_loop(self) -> Iterator[Pass | None]:
        """The one serving loop, vLLM-style: while a request waits and the running batch has room
        (max_batch), the next one starts with its prefill pass, alone; otherwise one decode pass runs
        for every running request together. Yields each pass for the engine to run (the loop goes on
        once it is done), or None when nothing can run until a request arrives."""
        max_batch = self.options.max_batch
        while self._done < len(self.requests):
            self._arrivals_due()
            if self._waiting and len(self._running) < max_batch:
                active = self._waiting.popleft()
                prefill = self._begin(active)
                if prefill is not None:
                    yield prefill
                self._admit(active, prefilled=prefill is not None)
            elif self._running:
                batch = list(self._running)
                yield merge_decode([a.next_pass for a in batch])
                self._tokens_out(batch)
            else:
                yield None

    # --- the policy's request and pass hooks, in the one order every engine calls them ---
    def request_started(self, info: RequestInfo, arrival_s: float) -> RequestTimer:
        """A request starts now: its timing record begins, the policy is told (its plan applied)."""
        timer = RequestTimer(info, arrival_s, self.now(), self.recorder)
        self._apply(self.calls.on_request_start(info))
        return timer

    def request_ended(self, info: RequestInfo, timer: RequestTimer) -> None:
        self.calls.on_request_end(info)
        timer.finish(self.now())

    @property
    def next_step(self) -> int:
        """The index the next forward pass's Step takes."""
        return self._step_index

    def step_started(self, step: Step) -> None:
        """A forward pass (step.index == next_step) starts: counted, the policy told (its plan applied)."""
        self._step_index += 1
        self.recorder.steps += 1
        self._apply(self.calls.on_step_start(step))

    def step_ended(self, step: Step) -> None:
        self.calls.on_step_end(step)

    def _passes(self, r: int) -> Iterator:
        """A request's forward passes (an engine may describe them more cheaply, with the same kinds)."""
        return request_passes(self.trace, r)

    def _arrive(self, when: float | None = None) -> None:
        r = self.requests[self._issued]
        self._issued += 1
        self._waiting.append(Active(r, request_info(self.trace, self._embeddings, r), self.now() if when is None else when))
        self._woken()

    def _begin(self, active: Active) -> Pass | None:
        """Start a request; returns its prefill pass, which the engine runs (alone), or None."""
        active.timer = self.request_started(active.info, active.arrival)
        active.passes = self._passes(active.index)
        active.next_pass = next(active.passes, None)
        return active.next_pass if active.next_pass is not None and active.next_pass.kind == "prefill" else None

    def _admit(self, active: Active, prefilled: bool) -> None:
        """After its prefill (if any): the request joins the running batch, or is done."""
        if prefilled:
            active.timer.token(self.now())
            active.next_pass = next(active.passes, None)
        if active.next_pass is None:
            self._finish(active)
        else:
            self._running.append(active)

    def _tokens_out(self, batch: list[Active]) -> None:
        """After a decode pass: each request of the batch has a token; finished ones leave."""
        now = self.now()
        for active in batch:
            active.timer.token(now)
            active.next_pass = next(active.passes, None)
            if active.next_pass is None:
                self._running.remove(active)
                self._finish(active)

    def _finish(self, active: Active) -> None:
        self.request_ended(active.info, active.timer)
        self._done += 1
        if self.on_request_done is not None:
            self.on_request_done(active.index)
        if self._arrivals is None and self._issued < len(self.requests):
            self._arrive()
