"""A GPU's inbound copy engine in SimPy: one copy at a time, taken from the copy queue.

A copy comes from host memory over the GPU's PCIe link (latency + bytes / bandwidth, per chunk) or,
when an NVLink peer holds the block resident and NVLink is faster, from that peer (the peer's copy
is pinned meanwhile). Host copies of all GPUs share the host side's aggregate limit, when the
profile sets one: concurrent transfers then split it fairly (a fluid model, re-planned whenever one
starts or ends). Memory is reserved when a copy starts (the policy picks victims then); a demand
copy that finds no evictable memory waits until the running layer unpins something, a prefetch
that finds none is dropped. Completions are SimPy timeouts with callbacks, not processes.

A demand waits only while waiting can succeed: when even every unpin to come (the running layer
unpins the blocks it computes before this one) would leave too little room, because the rest is
held by blocks the layer computes later or by prefetches parked half copied, the link frees that
memory instead, cheapest first: it cancels parked prefetches (lowest priority first), restarts a
later block's parked copy, and finally lets the policy evict blocks the layer computes later (latest
first; each is copied again, in its turn). realrun's copy engine is this class, so it does the same.
"""
from __future__ import annotations

import itertools
from typing import Callable

import simpy

from policies.base import DEMAND_PRIORITY, Block, Policy
from sim.cache import ExpertCache
from sim.compute import ComputeModel
from sim.copy_queue import CopyJob, CopyQueue
from sim.metrics import Recorder
from sim.profiles import HardwareProfile


class HostFabric:
    """The host side's aggregate bandwidth, shared max-min fairly by the host copies in flight."""

    def __init__(self, env: simpy.Environment, aggregate_Bps: float):
        self.env = env
        self.aggregate_Bps = aggregate_Bps
        self._active: dict[int, list] = {}  # id -> [remaining bytes, link bandwidth, rate, on_done]
        self._ids = itertools.count()
        self._last = 0.0
        self._version = 0

    def transfer(self, nbytes: float, cap_Bps: float, on_done: Callable[[], None]) -> None:
        self._progress()
        self._active[next(self._ids)] = [float(nbytes), cap_Bps, 0.0, on_done]
        self._plan()

    def _progress(self) -> None:
        elapsed = self.env.now - self._last
        if elapsed > 0:
            for transfer in self._active.values():
                transfer[0] -= transfer[2] * elapsed
        self._last = self.env.now

    def _plan(self) -> None:
        """Water-filling: each transfer gets min(its link's bandwidth, an equal share of what is left)."""
        left, waiting = self.aggregate_Bps, sorted(self._active.values(), key=lambda t: t[1])
        for i, transfer in enumerate(waiting):
            transfer[2] = min(transfer[1], left / (len(waiting) - i))
            left -= transfer[2]
        if not self._active:
            return
        self._version += 1
        version = self._version
        finish = min(max(t[0], 0.0) / t[2] for t in self._active.values())
        self.env.timeout(finish).callbacks.append(lambda _e: self._finish(version))

    def _finish(self, version: int) -> None:
        if version != self._version:
            return  # re-planned since
        self._progress()
        done = [key for key, t in self._active.items() if t[0] <= 1.0]  # within a byte: float noise
        callbacks = [self._active.pop(key)[3] for key in done]
        self._plan()
        for on_done in callbacks:
            on_done()


class HostLink:
    def __init__(self, env: simpy.Environment, gpu: int, caches: list[ExpertCache], policy: Policy,
                 hardware: HardwareProfile, peers: tuple[int, ...], recorder: Recorder,
                 fabric: HostFabric | None = None, links: list[HostLink] | None = None,
                 compute: ComputeModel | None = None, tier=None):
        self.env = env
        self.gpu = gpu
        self.caches = caches
        self.cache = caches[gpu]
        self.policy = policy
        self.spec = hardware.host_link
        self.nvlink = hardware.nvlink
        self.peers = peers
        self.recorder = recorder
        self.fabric = fabric
        self.links = links  # every GPU's link, to wake a peer's blocked demand after unpinning there
        self.compute = compute  # the GPUs' compute, which slides in the cache wait for and hold up
        self.mem_bandwidth_Bps = hardware.mem_bandwidth_Bps
        self.tier = tier  # sim.disk.HostTier: host RAM over the drive; None: every expert in RAM
        self.queue = CopyQueue()
        self.current: CopyJob | None = None
        self.blocked = False  # a demand copy waits for evictable memory
        self._waiters: dict[Block, simpy.Event] = {}
        self._chunks = max(1, int(policy.copy_chunks))
        self._released: list[Block] = []  # blocks of the running layer unpinned to make room (_make_room)

    def fetch(self, block: Block, priority: float, rank: float = 0.0) -> None:
        """Ask for a block; a block already queued or copying is only re-prioritised. Among equal
        priorities the lower rank is copied first (a layer ranks its demands in compute order)."""
        current = self.current
        if current is not None and current.block == block:
            current.priority = max(current.priority, priority)
            return
        if block in self.queue:
            self.queue.push(block, priority, 0, rank=rank)
        elif self.cache.holds(block):
            return
        else:
            if priority != DEMAND_PRIORITY:
                self.recorder.prefetches_requested += 1
            self.queue.push(block, priority, self.cache.block_bytes(block), self._chunks, rank)
        if current is None:
            self.kick()

    def cancel_prefetches(self) -> None:
        for job in self.queue.cancel_prefetches():
            self.recorder.prefetches_cancelled += 1
            if job.started:
                self.cache.cancel(job.block, job.copied_bytes)
                if job.source is not None:
                    self._release_source(job)
        self.kick()

    def ready(self, block: Block) -> simpy.Event:
        """An event that fires when the block has landed."""
        event = self._waiters.get(block)
        if event is None:
            event = self._waiters[block] = self.env.event()
        return event

    def kick(self) -> None:
        """Start the next copy if the link is idle and memory can be found for it."""
        if self.current is not None:
            return
        queue, cache = self.queue, self.cache
        while True:
            job = queue.peek()
            if job is None:
                self.blocked = False
                return
            slid = 0
            if not job.started:
                admitted = cache.admit(job.block, self.policy, job.demand) or (job.demand and self._make_room(job))
                if not admitted:
                    if job.demand:
                        self.blocked = True
                        return
                    queue.pop()
                    self.recorder.prefetches_dropped += 1
                    continue
                cache.reserve(job.block)
                job.started = True
                job.source = self._source(job)
                if self._released:
                    self._settle_released()
                slid = cache.take_slid_bytes()
            queue.pop()
            self.blocked = False
            if slid:
                self._after_slides(job, slid)
            else:
                self._start(job)
            return

    def _make_room(self, job: CopyJob) -> bool:
        """A demand found no room. If the unpins to come cannot make enough either (the memory is
        held by blocks the running layer computes after this one, or by parked half-copied copies),
        release such memory, cheapest first, until they can; True if the demand fits now."""
        cache, queue = self.cache, self.queue
        need = cache.block_bytes(job.block)
        before, after = cache.running_layer.pinned_while_waiting(job.block) if cache.running_layer else ((), ())
        before = [b for b in before if cache.holds(b)]
        later = [b for b in after if cache.holds(b) and b not in self._released]
        kept = set(before) | set(later)
        parked = [j for j in queue.jobs() if j.started and j is not job and j.block not in kept]
        stuck = sum(cache.block_bytes(b) for b in kept) + sum(j.nbytes for j in parked)
        room = cache.capacity_bytes - stuck  # what every unpin to come would leave
        if room >= need:
            return False  # wait for the running layer to unpin what it computes first
        for parked_job in sorted((j for j in parked if not j.demand), key=lambda j: j.priority):
            self._cancel(parked_job)
            room += parked_job.nbytes
            if room >= need:
                break
        for b in reversed(later):
            if room >= need:
                break
            if cache.is_resident(b):
                if cache.pin_count(b) != 1:
                    continue  # also a peer's copy source: free once that copy lands
                cache.unpin(b)  # the policy may evict it now; _settle_released pins it again
                self._released.append(b)
            else:  # a later block's copy, parked half done: start it again in its turn
                parked_job = queue.get(b)
                if parked_job is None:
                    continue
                cache.cancel(b, parked_job.copied_bytes)
                if parked_job.source is not None:
                    self._release_source(parked_job)
                    parked_job.source = None
                parked_job.started = False
                parked_job.chunks_left = parked_job.chunks
            room += cache.block_bytes(b)
        return cache.admit(job.block, self.policy, True)

    def _settle_released(self) -> None:
        """A demand has its room: the later blocks released for it are pinned again, and those the
        policy evicted are copied again when the layer's demands reach them."""
        cache, layer = self.cache, self.cache.running_layer
        for b in self._released:
            cache.pin(b)
            if not cache.holds(b):
                self.queue.push(b, DEMAND_PRIORITY, cache.block_bytes(b), self._chunks, layer.demand_rank(b))
        self._released.clear()

    def _cancel(self, job: CopyJob) -> None:
        """Drop a queued prefetch, releasing the memory it holds."""
        self.queue.discard(job)
        self.recorder.prefetches_cancelled += 1
        if job.started:
            self.cache.cancel(job.block, job.copied_bytes)
            if job.source is not None:
                self._release_source(job)

    def describe_wait(self) -> str:
        """What this link waits for, for an error message."""
        job, cache = self.queue.peek(), self.cache
        if self.current is not None:
            return f"GPU {self.gpu} is copying {self.current.block}"
        if job is None:
            return f"GPU {self.gpu} has nothing to copy"
        return (f"GPU {self.gpu} waits to copy {job.block} ({cache.block_bytes(job.block):,} bytes): "
                f"{cache.free_bytes():,} free and {cache.evictable_bytes():,} evictable of {cache.capacity_bytes:,}, "
                f"{len(self.queue)} copies queued")

    def _source(self, job: CopyJob) -> int | None:
        """An NVLink peer holding the block resident, when copying from it is faster; else the host."""
        if self.nvlink is None or self.nvlink.copy_time(job.nbytes) >= self.spec.copy_time(job.nbytes):
            return None
        for peer in self.peers:
            if self.caches[peer].is_resident(job.block):
                self.caches[peer].pin(job.block)  # the source may not be evicted mid-copy
                return peer
        return None

    def _after_slides(self, job: CopyJob, nbytes: int) -> None:
        """Room for the job was made by sliding `nbytes` of blocks down the cache (sim.placement):
        on the copy stream after the compute in flight, copied down through a staging buffer (each
        byte read and written twice, at device-memory speed); expert compute waits for the slides,
        the copy starts after them."""
        now = self.env.now
        start = max(now, self.compute.busy_until(self.gpu)) if self.compute is not None else now
        done = start + 4 * nbytes / self.mem_bandwidth_Bps
        if self.compute is not None:
            self.compute.hold(self.gpu, done)
        self.current = job  # the link is busy meanwhile
        self.env.timeout(done - now).callbacks.append(lambda _e: self._start(job))

    def _start(self, job: CopyJob) -> None:
        self.current = job
        if self.tier is not None and job.source is None and job.chunks_left == job.chunks:
            wait = self.tier.read(job.block[0], job.block[1], self.env.now)  # RAM, or the drive first
            if wait:
                self.env.timeout(wait).callbacks.append(lambda _e: self._copy(job))
                return
        self._copy(job)

    def _copy(self, job: CopyJob) -> None:
        if job.source is not None:
            self.env.timeout(self.nvlink.copy_time(job.chunk_bytes)).callbacks.append(self._chunk_done)
        elif self.fabric is None:
            self.env.timeout(self.spec.copy_time(job.chunk_bytes)).callbacks.append(self._chunk_done)
        else:
            self.env.timeout(self.spec.latency_s).callbacks.append(
                lambda _e: self.fabric.transfer(job.chunk_bytes, self.spec.bandwidth_Bps, lambda: self._chunk_done(None)))

    def _chunk_done(self, _event: simpy.Event | None) -> None:
        job = self.current
        self.current = None
        demand = job.demand
        self.recorder.copied(job.block[0], job.chunk_bytes, demand, peer=job.source is not None)
        job.chunks_left -= 1
        if job.chunks_left == 0:
            if job.source is not None:
                self._release_source(job)
            self.cache.commit(job.block, prefetched=not demand)
            waiter = self._waiters.pop(job.block, None)
            if waiter is not None:
                waiter.succeed()
            self.policy.on_copy_done(job.block, not demand)
        else:
            waiting = self.queue.peek()
            if waiting is not None and waiting.priority > job.priority:
                self.queue.requeue(job)
            else:
                self._start(job)
                return
        self.kick()

    def _release_source(self, job: CopyJob) -> None:
        self.caches[job.source].unpin(job.block)
        if self.links is not None and self.links[job.source].blocked:
            self.links[job.source].kick()
