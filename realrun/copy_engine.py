"""The real host-to-GPU copy engine: the simulator's link with its copies made by the GPU's DMA engine.

It IS sim.link.HostLink (same copy queue, same priorities, demand before prefetch, cancellation,
chunking and preemption between chunks, same admission and reservation points: memory is reserved
when a copy starts, a prefetch is dropped when no room can be made, a demand waits for an unpin, or
makes room when no unpin could),
with one change: a chunk is a cudaMemcpyAsync on the copy stream, and the executor learns that it
landed by polling its event (`poll()`), instead of a SimPy timeout firing.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Callable

from policies.base import Block, Policy
from realrun.backend import Backend, Event
from realrun.memory import HostExperts
from sim.copy_queue import CopyJob
from sim.link import HostLink
from sim.metrics import Recorder
from sim.placement import PlacedCache


# No modelled link or device memory (copies and slides are real), and no NVLink peer to fetch from:
# every copy reads host memory.
REAL_LINK = SimpleNamespace(host_link=None, nvlink=None, mem_bandwidth_Bps=None)


class CopyEngine(HostLink):
    def __init__(self, gpu: int, backend: Backend, caches: list[PlacedCache], policy: Policy, recorder: Recorder,
                 host: HostExperts, part_bytes: Callable[[int], list[int]], sleep_on_copies: bool = False):
        super().__init__(None, gpu, caches, policy, REAL_LINK, (), recorder)
        self.sleep_on_copies = sleep_on_copies
        self.backend = backend
        self.host = host
        self.part_bytes = part_bytes  # layer -> bytes of each part of its experts
        self._landing: Event | None = None

    def _start(self, job: CopyJob) -> None:
        self.current = job
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

    def _after_slides(self, job: CopyJob, nbytes: int) -> None:
        self._start(job)  # the pool made the slides on the GPU's copy stream, ahead of this copy

    def ready(self, block: Block):
        raise TypeError("realrun polls the copy engine (poll()); there is no SimPy event to wait on")

    def sleep_until_landed(self) -> None:
        """Block the host (asleep, with sleep_on_copies) until the chunk on the link has landed."""
        if self.current is not None:
            self._landing.synchronize()

    def poll(self) -> bool:
        """Handle the chunk on the link if it has landed (then start the next one). True if one landed."""
        if self.current is not None and self._landing.query():
            self._landing = None
            self._chunk_done(None)
            return True
        return False
