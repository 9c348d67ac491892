"""The fast engine: sim.engine's results, bit for bit, for the policies it can express, without SimPy.

A policy opts in with a class attribute `fast_path` naming what it is (declared on the class itself;
a subclass that changes behaviour does not inherit it):
- "lru": touch on use, copy on demand only, evict the least recently used (policies.lru: per-layer
  quotas or global scope);
- "belady": copy on demand only, evict the furthest next use (policies.belady, either scope);
- "resident": ignores the budget, every expert resident from the start (policies.all_resident);
- "next_layer": gathers whole layers and streams the next one in, dropping finished layers
  (policies.deepspeed);
- "oracle": replaces its prefetches by the soonest future needs before every pass and after every
  router, Belady victims, declining a prefetch whose victim is needed first (policies.oracle_prefetch).
The first three run in sim.fast.kernel; the prefetching two, whose plans do not depend on timing
but whose copies overlap compute across layers, in sim.fast.stream.

Serving (arrivals, batching, request records) is sim.replay.Serving, as in the SimPy engine; the
forward passes run in sim.fast.kernel. Setup (binding, quotas, warm start) goes through the same
shared code and the policy object itself; the kernel then carries its state. Where the kernel meets
what it does not model it declines (FastPathDeclined) and sim.api runs the SimPy engine instead.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import numpy as np

from policies.base import Policy, PolicyContext, Timing
from sim.cache import ExpertCache
from sim.compute import ComputeModel
from sim.future import ReplayFuture
from sim.metrics import Recorder
from sim.profiles import HardwareProfile
from sim.replay import (RunState, Serving, SimOptions, arrival_times, bind_policy, cache_capacities, check_options,
                        check_room, initial_blocks, part_bytes, policy_host_time, warm)
from sim.fast.stream import CAP, EVICT, HIGH, NEXT_LAYER, ORACLE, WASTE, Stream
from sim.schedule import has_prefill
from sim.topology import Topology
from traces import ModelSpec, Trace

KINDS = ("lru", "belady", "resident", "next_layer", "oracle")
STREAMED = {"next_layer": NEXT_LAYER, "oracle": ORACLE}  # sim.fast.stream's kinds


class FastPathDeclined(Exception):
    """The run met a case the fast engine does not model; the SimPy engine runs it instead."""


def fast_kind(policy: Policy, options: SimOptions, hardware: HardwareProfile) -> tuple[str | None, str]:
    """(the policy's fast-path kind, '') when the fast engine can run it, else (None, why not)."""
    kind = type(policy).__dict__.get("fast_path")
    if kind not in KINDS:
        return None, f"policy '{policy.name}' declares no fast path"
    if options.placement != "layers":
        return None, "placement=experts runs on the SimPy engine"
    if options.host_budget_bytes is not None:
        return None, "host_budget (the disk tier) runs on the SimPy engine"
    if policy.copy_chunks != 1 or policy.loads_whole_layer != (kind == "next_layer") or policy.compute_order != "index":
        return None, f"policy '{policy.name}' copies in chunks, gathers layers or reorders compute"
    if hardware.policy_host_time(policy.name).charges_landings:
        return None, (f"hardware '{hardware.name}' charges host time per copy landed for '{policy.name}' "
                      "(policy_host_s.land_s), which runs on the SimPy engine")
    return kind, ""


@dataclass(frozen=True)
class CacheTotals:
    """What the summary reads of a GPU's cache after a run."""

    capacity_bytes: int
    high_water_bytes: int
    evictions: int
    wasted_prefetch_bytes: int = 0


class PassRef(NamedTuple):
    kind: str  # "prefill" | "decode"
    row: int  # the trace row of a decode pass; -1 for a prefill


class TraceTables:
    """Per-trace arrays the kernel reads, built once per trace with numpy (no loop per token)."""

    def __init__(self, trace: Trace):
        self.experts = np.ascontiguousarray(trace.experts, dtype=np.int64)
        self.counts = np.ascontiguousarray(trace.prefill_counts, dtype=np.int64)
        self.offset = np.asarray(trace.iter_offset, dtype=np.int64)
        self.prefill = np.asarray(trace.prefill_iters, dtype=np.int64)
        self.decode = np.asarray(trace.decode_iters, dtype=np.int64)
        self.has_prefill = has_prefill(trace)
        prompt = trace.requests["prompt_tokens"].to_numpy().astype(np.int64)
        self.prefill_tokens = np.maximum(np.maximum(prompt, self.prefill), 1)


class FastSimulation(Serving):
    def __init__(self, trace: Trace, policy: Policy, model: ModelSpec, hardware: HardwareProfile, budget_bytes: int,
                 requests: list[int], options: SimOptions | None = None,
                 on_request_done: Callable[[int], None] | None = None, tables: TraceTables | None = None):
        opts = self.options = options or SimOptions()
        check_options(opts, policy)
        self.kind, why = fast_kind(policy, opts, hardware)
        if self.kind is None:
            raise FastPathDeclined(why)
        self.trace, self.policy, self.model, self.hardware = trace, policy, model, hardware
        self.requests = list(requests)
        self.topology = topo = Topology.build(hardware, model, opts.gpus, opts.placement)
        self.recorder = Recorder(model.num_layers)
        self.compute = ComputeModel(hardware, model)
        bpe = model.bytes_per_expert
        capacities = cache_capacities(policy, model, topo, budget_bytes, opts.budget_scope)
        self.policy_host = policy_host_time(hardware, policy, model, capacities)
        self.caches = [ExpertCache(c, lambda _b: bpe) for c in capacities]
        self.tables = tables or TraceTables(trace)
        self.activation_bytes_per_token = model.hidden_size * model.bytes_per_param
        self.serving_state(arrival_times(opts, trace, self.requests), on_request_done)
        self._now: float = 0  # SimPy's clock starts at int 0 (an arrival then records 0, not 0.0)

    def now(self) -> float:
        return self._now

    def _apply(self, plan) -> None:
        if plan is not None:
            raise FastPathDeclined(f"policy '{self.policy.name}' returned a prefetch plan")

    def _passes(self, r: int) -> Iterator[PassRef]:
        tables = self.tables
        if tables.has_prefill[r]:
            yield PassRef("prefill", -1)
        first = tables.offset[r] + tables.prefill[r]
        for row in range(first, first + tables.decode[r]):
            yield PassRef("decode", row)

    def prepare(self, train_requests: list[int]) -> None:
        """As sim.engine.Simulation.prepare (the same shared steps), then the kernel's state from it."""
        topo, model = self.topology, self.model
        timing = Timing(self.hardware.host_link.copy_time, self.compute.expert_time, self.compute.non_expert_time)
        self.future = ReplayFuture(self.trace, self.requests) if self.policy.reads_future else None
        ctx = PolicyContext(model, self.caches, topo.home, topo.layers_of, np.random.default_rng(self.options.seed),
                            self.future, timing)
        fractions = bind_policy(self.policy, ctx, self.trace, train_requests)
        if any(f != (1.0,) for f in fractions):
            raise FastPathDeclined(f"policy '{self.policy.name}' splits experts into parts")
        check_room(self.policy, self.caches, [part_bytes(model, f) for f in fractions], self.options.budget_scope)
        for gpu, cache in enumerate(self.caches):
            warm(cache, self.policy, initial_blocks(self.policy, ctx, gpu, fractions, self.options.warm_start))
        self._state()

    def _state(self) -> None:
        """The caches (and the policy's recency and quotas, in the order warm() made them) as arrays."""
        L, E = self.model.num_layers, self.model.num_experts
        N = L * E
        self._expert_times()
        self._xfer: dict[int, int] = {}
        self._xfer_rows: list[np.ndarray] = []
        self.xfer = np.zeros((0, L))
        self.stream = Stream(STREAMED[self.kind], self) if self.kind in STREAMED else None
        if self.stream is not None:
            return
        self.resident = np.zeros(N, np.bool_)
        self.pin_until = np.full(N, -1.0)
        self.gprev, self.gnext = np.arange(N + 1, dtype=np.int64), np.arange(N + 1, dtype=np.int64)
        self.lprev, self.lnext = np.arange(N + L, dtype=np.int64), np.arange(N + L, dtype=np.int64)
        from sim.fast.kernel import _append
        for cache in self.caches:
            for layer, e, _ in cache.resident_blocks():  # insertion order: as placed, the policy's recency
                b = layer * E + e
                self.resident[b] = True
                _append(self.gprev, self.gnext, N, b)
                _append(self.lprev, self.lnext, N + layer, b)
        self.cap = np.array([c.capacity_bytes for c in self.caches], np.int64)
        self.used = np.array([c.used_bytes for c in self.caches], np.int64)
        self.nres = np.array([sum(1 for _ in c.resident_blocks()) for c in self.caches], np.int64)
        self.high = np.array([c.high_water_bytes for c in self.caches], np.int64)
        self.evictions = np.array([c.evictions for c in self.caches], np.int64)
        quota = getattr(self.policy, "quota", None) if self.kind != "resident" else None
        future = self.future
        self.uses_ptr = future.uses_ptr if future is not None else np.zeros(N + 1, np.int64)
        self.uses_pos = future.block_uses if future is not None else np.zeros(0, np.int64)
        self.cursor = self.uses_ptr[:-1].copy()
        self.use_quota = quota is not None
        self.qcount, self.qcap = np.zeros(L, np.int64), np.zeros(L, np.int64)
        self.over = np.zeros(L, np.bool_)
        gpu_of = self.topology.layer_gpu
        if quota is not None:
            for layer in range(L):
                key = (gpu_of[layer], layer)
                self.qcount[layer], self.qcap[layer] = quota.count[key], quota.quota[key]
                self.over[layer] = key in quota.over_keys
        self.nover = np.array([int(self.over.sum())], np.int64)
        self.layer_gpu = np.asarray(gpu_of, np.int64)
        self.hits, self.misses, self.uses = (np.zeros(L, np.int64) for _ in range(3))
        self.stall, self.lbytes = np.zeros(L), np.zeros(L)
        self.dbytes = np.zeros(1)
        G = self.topology.num_gpus  # sim.compute's per-GPU state: a run starts cold, idle since 0
        self.warmth, self.busy_until = np.zeros(G), np.zeros(G)

    def _expert_times(self) -> None:
        tables = self.tables
        needed = np.union1d(np.unique(tables.counts[self.requests]), np.arange(1, self.options.max_batch + 1))
        self.extime = np.zeros(int(needed.max()) + 1)
        for n in needed:
            if n:
                self.extime[n] = self.compute.expert_time(int(n))

    def _xfer_index(self, tokens: int) -> int:
        """The row of the hidden state's move into each layer, for a pass of `tokens` tokens."""
        i = self._xfer.get(tokens)
        if i is None:
            topo, gpu = self.topology, self.topology.layer_gpu
            nbytes = tokens * self.activation_bytes_per_token
            row = np.array([topo.transfer_time(self.hardware, gpu[l - 1], gpu[l], nbytes) if l and gpu[l] != gpu[l - 1]
                            else 0.0 for l in range(len(gpu))])
            i = self._xfer[tokens] = len(self._xfer_rows)
            self._xfer_rows.append(row)
            self.xfer = np.array(self._xfer_rows)
        return i

    def _run(self, kinds, refs, row_start, row_count, rows, tokens) -> np.ndarray:
        """Run passes in the kernel from now; returns their end times."""
        from sim.fast.kernel import ABORT
        ne = np.array([self.compute.non_expert_time(int(n)) for n in tokens]) if len(set(tokens)) > 1 else \
            np.full(len(tokens), self.compute.non_expert_time(int(tokens[0])))
        xi = np.array([self._xfer_index(int(n)) for n in tokens], np.int64) if len(set(tokens)) > 1 else \
            np.full(len(tokens), self._xfer_index(int(tokens[0])), np.int64)
        ends = np.empty(len(kinds))
        if self.stream is not None:
            t = self.stream.run(kinds, refs, row_start, row_count, rows, ne, self.xfer, xi, self.extime, self.tables,
                                self.recorder.steps, float(self._now), ends)
        else:
            t = self._demand_passes(kinds, refs, row_start, row_count, rows, ne, xi, ends)
        if t == ABORT:
            raise FastPathDeclined(self.stream.failed if self.stream is not None else
                                   "a layer's outcome hinges on what the kernel does not model")
        self.recorder.steps += len(kinds)
        return ends

    def _demand_passes(self, kinds, refs, row_start, row_count, rows, ne, xi, ends) -> float:
        from sim.fast.kernel import run_passes
        hw, host = self.hardware, self.policy_host
        fabric = hw.host_aggregate_Bps is not None and \
            hw.host_aggregate_Bps < self.topology.num_gpus * hw.host_link.bandwidth_Bps
        link, aw = hw.host_link, hw.after_wait
        bpe = self.model.bytes_per_expert
        return run_passes(kinds, refs, row_start, row_count, rows, ne, self.xfer, xi, float(host.step_s),
                       float(host.layer_s), self.extime, self.tables.experts, self.tables.counts, self.layer_gpu,
                       self.model.num_experts, bpe, link.copy_time(bpe), fabric, link.latency_s,
                       min(link.bandwidth_Bps, hw.host_aggregate_Bps) if fabric else 1.0,
                       self.kind == "lru", self.use_quota, self.resident, self.pin_until, self.cap, self.used,
                       self.nres, self.high, self.evictions, self.gprev, self.gnext, self.lprev, self.lnext,
                       self.qcount, self.qcap, self.over, self.nover, self.hits, self.misses, self.uses, self.stall,
                       self.lbytes, self.dbytes, float(self._now), ends, self.kind == "belady", self.recorder.steps,
                       self.uses_ptr, self.uses_pos, self.cursor, aw is not None, aw.cold_factor if aw else 1.0,
                       aw.warm_up_s if aw else 1.0, aw.cool_down_s if aw else 1.0, self.warmth, self.busy_until)

    # --- serving, as sim.engine._serve ---
    def run(self) -> RunState:
        n, max_batch = len(self.requests), self.options.max_batch
        times = self._arrival_clock()
        next_arrival = 0
        if times is None:
            for _ in range(min(self.options.clients, n)):
                self._arrive()
        while self._done < n:
            while times is not None and next_arrival < len(times) and times[next_arrival] <= self._now:
                self._arrive(times[next_arrival])
                next_arrival += 1
            if self._waiting and len(self._running) < max_batch:
                active = self._waiting.popleft()
                self._begin(active)
                if max_batch == 1:
                    self._whole_request(active)
                else:
                    if active.next_pass is not None and active.next_pass.kind == "prefill":
                        self._now = self._one_pass(0, active.index, [])
                        self._admit(active, prefilled=True)
                    else:
                        self._admit(active, prefilled=False)
            elif self._running:
                batch = list(self._running)
                self._now = self._one_pass(1, -1, [a.next_pass.row for a in batch])
                self._tokens_out(batch)
            else:
                self._now = times[next_arrival]
                self._links_until(self._now)  # the copies go on while the server waits
                continue
            if max_batch > 1 and times is not None and next_arrival < len(times) and times[next_arrival] == self._now:
                raise FastPathDeclined("an arrival at the very instant a pass ends (SimPy's event order decides)")
        if self.stream is not None:  # the copies still queued land before the run ends
            self._now = max(self._now, self._links_until(np.inf))
            self.stream.record(self.recorder)
            gi = self.stream.gi
            totals = [CacheTotals(int(c), int(h), int(e), int(w))
                      for c, h, e, w in zip(gi[:, CAP], gi[:, HIGH], gi[:, EVICT], gi[:, WASTE])]
        else:
            self._record()
            totals = [CacheTotals(int(c), int(h), int(e)) for c, h, e in zip(self.cap, self.high, self.evictions)]
        self.recorder.layer_iterations = self.recorder.steps * self.model.num_layers  # start_layer: one a layer
        return RunState(self.recorder, totals, self._now)

    def _links_until(self, when: float) -> float:
        """The copies landing by `when` while the server waits (those of a prefetching kind)."""
        if self.stream is None:
            return -np.inf
        last = self.stream.until(when)
        if self.stream.failed:
            raise FastPathDeclined(self.stream.failed)
        return last

    def _arrival_clock(self) -> list[float] | None:
        """When sim.engine's arrival process delivers each request: it sleeps from one arrival to the
        next (now + (when - now), as SimPy adds a timeout's delay)."""
        if self._arrivals is None:
            return None
        clock, now = [], 0
        for when in self._arrivals.tolist():
            if when > now:
                now = now + (when - now)
            clock.append(now)
        return clock

    def _one_pass(self, kind: int, ref: int, rows: list[int]) -> float:
        tokens = self.tables.prefill_tokens[ref] if kind == 0 else len(rows)
        ends = self._run(np.array([kind], np.int64), np.array([ref], np.int64), np.zeros(1, np.int64),
                         np.array([len(rows)], np.int64), np.array(rows, np.int64), [tokens])
        return float(ends[0])

    def _whole_request(self, active) -> None:
        """With max_batch=1 a request's passes run back to back: the kernel runs them in one call."""
        tables, r = self.tables, active.index
        prefilled = active.next_pass is not None and active.next_pass.kind == "prefill"
        first = tables.offset[r] + tables.prefill[r]
        decode = int(tables.decode[r])
        rows = np.arange(first, first + decode, dtype=np.int64)
        count = prefilled + decode
        if count == 0:
            self._admit(active, prefilled=False)
            return
        kinds = np.ones(count, np.int64)
        row_start = np.zeros(count, np.int64)
        row_start[prefilled:] = np.arange(decode)
        row_count = np.ones(count, np.int64)
        tokens = [1] * count
        if prefilled:
            kinds[0], row_count[0], tokens[0] = 0, 0, int(tables.prefill_tokens[r])
        ends = self._run(kinds, np.full(count, r, np.int64), row_start, row_count, rows, tokens).tolist()
        if prefilled:
            self._now = ends[0]
        self._admit(active, prefilled=prefilled)
        for end in ends[prefilled:]:
            self._now = end
            self._tokens_out([active])

    def _record(self) -> None:
        rec = self.recorder
        rec.uses, rec.hits, rec.misses = self.uses.tolist(), self.hits.tolist(), self.misses.tolist()
        rec.stall_s, rec.layer_bytes = self.stall.tolist(), self.lbytes.tolist()
        rec.demand_bytes = float(self.dbytes[0])


_tables: "weakref.WeakKeyDictionary[Trace, TraceTables]" = weakref.WeakKeyDictionary()


def tables_for(trace: Trace) -> TraceTables:
    """The kernel's arrays of a trace, built once per loaded trace."""
    tables = _tables.get(trace)
    if tables is None:
        tables = _tables[trace] = TraceTables(trace)
    return tables
