"""A GPU's inbound copies, engine-neutral: which copy goes next, room for it, release, landing.

One copy at a time per GPU, taken from the copy queue (sim.copy_queue: priorities, demand before
prefetch, cancellation, chunks). Memory is reserved when a copy starts (the policy picks victims
then); a demand copy that finds no evictable memory waits until the running layer unpins something,
a prefetch that finds none is dropped. The policy hears of every prefetch that will not land
(on_copy_cancelled). A copy comes from host memory or, when the engine allows it
(peer_faster) and an NVLink peer holds the block resident, from that peer (the peer's copy is pinned
meanwhile).

A demand waits only while waiting can succeed: when even every unpin to come (the running layer
unpins the blocks it computes before this one) would leave too little room, because the rest is
held by blocks the layer computes later or by prefetches parked half copied, the scheduler frees
that memory instead, cheapest first: it cancels parked prefetches (lowest priority first), restarts
a later block's parked copy, and finally lets the policy evict blocks the layer computes later
(latest first; each is copied again, in its turn).

How the bytes move is the engine's Transport: the simulator's SimPy link (sim.link) or realrun's
DMA on the copy stream (realrun.copy_engine). Both engines therefore schedule copies alike.
"""
from __future__ import annotations

from typing import Callable, Protocol, Sequence

from policies.base import DEMAND_PRIORITY, Block, Policy
from sim.cache import ExpertCache
from sim.copy_queue import CopyJob, CopyQueue
from sim.metrics import Recorder


class Transport(Protocol):
    """How an engine moves a copy's bytes."""

    def start(self, job: CopyJob) -> None:
        """Copy the job's next chunk; call the scheduler's chunk_landed() once it has landed."""

    def after_slides(self, job: CopyJob, nbytes: int) -> None:
        """Room for the job was made by sliding `nbytes` of blocks down the cache (sim.placement):
        start the copy after the slides."""

    def landed(self, block: Block) -> None:
        """The block is resident now (whoever waits for it may go on)."""


class CopyScheduler:
    def __init__(self, gpu: int, caches: list[ExpertCache], policy: Policy, recorder: Recorder,
                 peers: tuple[int, ...] = (), peer_faster: Callable[[int], bool] | None = None,
                 schedulers: Sequence[CopyScheduler] | None = None):
        """peer_faster(nbytes): whether copying from an NVLink peer beats the host link (None: never);
        schedulers: every GPU's, to wake a peer's blocked demand after unpinning there. Set
        `transport` before the first fetch."""
        self.gpu = gpu
        self.caches = caches
        self.cache = caches[gpu]
        self.policy = policy
        self.recorder = recorder
        self.peers = peers
        self.peer_faster = peer_faster
        self.schedulers = schedulers
        self.transport: Transport | None = None
        self.queue = CopyQueue()
        self.current: CopyJob | None = None
        self.blocked = False  # a demand copy waits for evictable memory
        self._chunks = max(1, int(policy.copy_chunks))
        self._released: list[Block] = []  # blocks of the running layer unpinned to make room (_make_room)
        self._hears_cancels = type(policy).on_copy_cancelled is not Policy.on_copy_cancelled

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
        self.recorder.prefetches_cancelled += self.queue.batched()
        for job in self.queue.cancel_prefetches():
            self._release(job)
        self.kick()

    def fetch_plan(self, blocks: list[Block], priorities: list[float], descending: bool) -> None:
        """fetch() each prefetch blocks[i] at priorities[i], in turn, while a copy is on the link (so
        none starts meanwhile). Distinct blocks in descending priority onto a queue holding no
        prefetch go as one batch (CopyQueue.push_batch), with the same counts and the same order;
        not for a policy that hears cancellations (a batch's are not told one by one)."""
        live = dict(zip(blocks, range(len(blocks))))
        if not descending or len(live) < len(blocks) or self._hears_cancels or self.queue.holds_prefetches():
            for block, priority in zip(blocks, priorities):
                self.fetch(block, priority)
            return
        current = self.current
        i = live.pop(current.block, None)
        if i is not None:
            current.priority = max(current.priority, priorities[i])
        # What else is in flight is queued (started, preempted): a queued block's demand keeps its
        # infinite priority, so those entries change nothing.
        for block in self.queue.blocks():
            live.pop(block, None)
        self.recorder.prefetches_requested += len(live)
        self.queue.push_batch(blocks, priorities, live, self._new_job)

    def _new_job(self, block: Block, priority: float) -> CopyJob:
        return CopyJob(block, priority, self.cache.block_bytes(block), self._chunks, self._chunks)

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
                    self.policy.on_copy_cancelled(job.block)
                    continue
                cache.reserve(job.block)
                job.started = True
                job.source = self._source(job)
                if self._released:
                    self._settle_released()
                slid = cache.take_slid_bytes()
            queue.pop()
            self.blocked = False
            self.current = job  # the link is busy from here, slides included
            if slid:
                self.transport.after_slides(job, slid)
            else:
                self.transport.start(job)
            return

    def chunk_landed(self) -> None:
        """The transport's report that the current chunk has landed: the block is committed when it
        was the last; otherwise a higher-priority copy waiting preempts the rest, or the next chunk goes."""
        job = self.current
        self.current = None
        demand = job.demand
        self.recorder.copied(job.block[0], job.chunk_bytes, demand, peer=job.source is not None)
        job.chunks_left -= 1
        if job.chunks_left == 0:
            if job.source is not None:
                self._release_source(job)
            self.cache.commit(job.block, prefetched=not demand)
            self.transport.landed(job.block)
            self.policy.on_copy_done(job.block, not demand)
        else:
            waiting = self.queue.peek()
            if waiting is not None and waiting.priority > job.priority:
                self.queue.requeue(job)
            else:
                self.current = job
                self.transport.start(job)
                return
        self.kick()

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
        self._release(job)

    def _release(self, job: CopyJob) -> None:
        """A prefetch taken off the queue: the memory it holds is released, the policy told."""
        self.recorder.prefetches_cancelled += 1
        if job.started:
            self.cache.cancel(job.block, job.copied_bytes)
            if job.source is not None:
                self._release_source(job)
        self.policy.on_copy_cancelled(job.block)

    def describe_wait(self) -> str:
        """What this GPU's copies wait for, for an error message."""
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
        if self.peer_faster is None or not self.peer_faster(job.nbytes):
            return None
        for peer in self.peers:
            if self.caches[peer].is_resident(job.block):
                self.caches[peer].pin(job.block)  # the source may not be evicted mid-copy
                return peer
        return None

    def _release_source(self, job: CopyJob) -> None:
        self.caches[job.source].unpin(job.block)
        if self.schedulers is not None and self.schedulers[job.source].blocked:
            self.schedulers[job.source].kick()
