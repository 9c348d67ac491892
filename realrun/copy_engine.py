"""The real host-to-GPU copy engine: the simulator's copy scheduler, with its copies made by the GPU's DMA engine.

It composes sim.copy_scheduler.CopyScheduler (the same copy queue, priorities, demand before
prefetch, cancellation, chunking and preemption between chunks, the same admission and reservation
points: memory is reserved when a copy starts, a prefetch is dropped when no room can be made, a
demand waits for an unpin, or makes room when no unpin could) and is its Transport: a chunk is a
cudaMemcpyAsync on the copy stream, and the executor learns that it landed by polling its event
(`poll()`). Every copy reads host memory (no NVLink peers).
"""
from __future__ import annotations

import time
from typing import Callable

from policies.base import Block, Policy
from realrun.backend import Backend, Event
from realrun.memory import HostExperts
from sim.copy_queue import CopyJob
from sim.copy_scheduler import CopyScheduler
from sim.layer_protocol import LAUNCH, HostObserver, chunk_landed
from sim.metrics import Recorder
from sim.placement import PlacedCache


class CopyEngine:
    def __init__(self, gpu: int, backend: Backend, caches: list[PlacedCache], policy: Policy, recorder: Recorder,
                 host: HostExperts, part_bytes: Callable[[int], list[int]], sleep_on_copies: bool = False,
                 land: Callable[[CopyScheduler], None] = chunk_landed, observer: HostObserver | None = None):
        self.scheduler = CopyScheduler(gpu, caches, policy, recorder)
        self.scheduler.transport = self
        self.cache = caches[gpu]
        self.sleep_on_copies = sleep_on_copies
        self.backend = backend
        self.host = host
        self.part_bytes = part_bytes  # layer -> bytes of each part of its experts
        self._landing: Event | None = None
        self.land = land  # the landing's handling (the executor's HostCalls.chunk_landed, timed when observed)
        self.observer = observer

    @property
    def busy(self) -> bool:
        """A chunk is on the link."""
        return self.scheduler.current is not None

    def start(self, job: CopyJob) -> None:
        if self.observer is None:
            self._start(job)
            return
        started = time.perf_counter()
        self._start(job)
        self.observer(LAUNCH, time.perf_counter() - started)

    def _start(self, job: CopyJob) -> None:
        block = job.block
        chunk = job.chunks - job.chunks_left
        lo, hi = job.nbytes * chunk // job.chunks, job.nbytes * (chunk + 1) // job.chunks
        dst = self.cache.pool.view(block)
        src = self.host.block(block, self.part_bytes(block[0]))
        backend = self.backend
        with backend.on_copy():
            if chunk == 0:
                # The place may have been another block's, still read by compute launched earlier.
                for event in self.cache.pool.take_waits(block):
                    backend.copy_waits_for(event)
            dst[lo:hi].copy_(src[lo:hi], non_blocking=True)
            self._landing = backend.record_copy(blocking=self.sleep_on_copies)

    def after_slides(self, job: CopyJob, nbytes: int) -> None:
        self.start(job)  # the pool made the slides on the GPU's copy stream, ahead of this copy

    def landed(self, block: Block) -> None:
        pass  # the executor polls: it sees the block resident

    def sleep_until_landed(self) -> None:
        """Block the host (asleep, with sleep_on_copies) until the chunk on the link has landed."""
        if self.busy:
            self._landing.synchronize()

    def poll(self) -> bool:
        """Handle the chunk on the link if it has landed (then start the next one). True if one landed."""
        if self.busy and self._landing.query():
            self._landing = None
            self.land(self.scheduler)
            return True
        return False
