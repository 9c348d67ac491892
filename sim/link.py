"""A GPU's host-to-GPU link in SimPy: one copy at a time, taken from the copy queue.

A copy costs the link's fixed latency plus bytes over bandwidth, per chunk. Memory is reserved when
a copy starts (the policy picks victims then); a demand copy that finds no evictable memory waits
until the running layer unpins something, a prefetch that finds none is dropped. Completions are
SimPy timeouts with callbacks, not processes: the cheapest event SimPy has.
"""
from __future__ import annotations

import simpy

from policies.base import DEMAND_PRIORITY, Block, Policy
from sim.cache import ExpertCache
from sim.copy_queue import CopyJob, CopyQueue
from sim.metrics import Recorder
from sim.profiles import LinkSpec


class HostLink:
    def __init__(self, env: simpy.Environment, cache: ExpertCache, policy: Policy, spec: LinkSpec, recorder: Recorder):
        self.env = env
        self.cache = cache
        self.policy = policy
        self.spec = spec
        self.recorder = recorder
        self.queue = CopyQueue()
        self.current: CopyJob | None = None
        self.blocked = False  # a demand copy waits for evictable memory
        self._waiters: dict[Block, simpy.Event] = {}
        self._chunks = max(1, int(policy.copy_chunks))

    def is_pending(self, block: Block) -> bool:
        """Queued or on the link."""
        return block in self.queue or (self.current is not None and self.current.block == block)

    def fetch(self, block: Block, priority: float) -> None:
        """Ask for a block; a block already queued or copying is only re-prioritised."""
        current = self.current
        if current is not None and current.block == block:
            current.priority = max(current.priority, priority)
            return
        if block in self.queue:
            self.queue.push(block, priority, 0)
        elif self.cache.holds(block):
            return
        else:
            if priority != DEMAND_PRIORITY:
                self.recorder.prefetches_requested += 1
            self.queue.push(block, priority, self.cache.block_bytes(block), self._chunks)
        if current is None:
            self.kick()

    def cancel_prefetches(self) -> None:
        for job in self.queue.cancel_prefetches():
            self.recorder.prefetches_cancelled += 1
            if job.started:
                self.cache.cancel(job.block, job.copied_bytes)
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
            if not job.started:
                if not cache.admit(job.block, self.policy, job.demand):
                    if job.demand:
                        self.blocked = True
                        return
                    queue.pop()
                    self.recorder.prefetches_dropped += 1
                    continue
                cache.reserve(job.block)
                job.started = True
            queue.pop()
            self.blocked = False
            self._start(job)
            return

    def _start(self, job: CopyJob) -> None:
        self.current = job
        self.env.timeout(self.spec.copy_time(job.chunk_bytes)).callbacks.append(self._chunk_done)

    def _chunk_done(self, _event: simpy.Event) -> None:
        job = self.current
        self.current = None
        demand = job.demand
        self.recorder.copied(job.block[0], job.chunk_bytes, demand)
        job.chunks_left -= 1
        if job.chunks_left == 0:
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
