"""The host-to-GPU copy queue: priorities, demand before prefetch, cancellation, chunked copies.

Engine-neutral, like the cache: the simulator's link and realrun's copy engine both take the next
copy from here. Among equal priorities the earlier request goes first.
"""
from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass

from policies.base import DEMAND_PRIORITY, Block


@dataclass(slots=True, eq=False)
class CopyJob:
    block: Block
    priority: float
    nbytes: int
    chunks: int
    chunks_left: int
    started: bool = False  # memory reserved; part of it may already be copied
    valid: bool = True
    source: int | None = None  # None: host memory; else the peer GPU it is copied from

    @property
    def demand(self) -> bool:
        return self.priority == DEMAND_PRIORITY

    @property
    def chunk_bytes(self) -> float:
        return self.nbytes / self.chunks

    @property
    def copied_bytes(self) -> int:
        return self.nbytes * (self.chunks - self.chunks_left) // self.chunks


class CopyQueue:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, CopyJob]] = []
        self._jobs: dict[Block, CopyJob] = {}
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._jobs)

    def __contains__(self, block: Block) -> bool:
        return block in self._jobs

    def get(self, block: Block) -> CopyJob | None:
        return self._jobs.get(block)

    def push(self, block: Block, priority: float, nbytes: int, chunks: int = 1) -> CopyJob:
        """Queue a copy; a block already queued keeps one job, at the higher of the two priorities."""
        job = self._jobs.get(block)
        if job is not None:
            if priority > job.priority:
                self._reprioritise(job, priority)
            return job
        job = CopyJob(block, priority, nbytes, chunks, chunks)
        self._jobs[block] = job
        heapq.heappush(self._heap, (-priority, next(self._seq), job))
        return job

    def requeue(self, job: CopyJob) -> None:
        """Put a partly copied job back (a demand preempted it between chunks)."""
        self._jobs[job.block] = job
        job.valid = True
        heapq.heappush(self._heap, (-job.priority, next(self._seq), job))

    def _reprioritise(self, job: CopyJob, priority: float) -> None:
        job.valid = False
        fresh = CopyJob(job.block, priority, job.nbytes, job.chunks, job.chunks_left, job.started, source=job.source)
        self._jobs[job.block] = fresh
        heapq.heappush(self._heap, (-priority, next(self._seq), fresh))

    def peek(self) -> CopyJob | None:
        heap = self._heap
        while heap and not heap[0][2].valid:
            heapq.heappop(heap)
        return heap[0][2] if heap else None

    def pop(self) -> CopyJob | None:
        job = self.peek()
        if job is not None:
            heapq.heappop(self._heap)
            del self._jobs[job.block]
        return job

    def cancel_prefetches(self) -> list[CopyJob]:
        """Drop every queued prefetch; returns them (started ones hold memory the caller must release)."""
        cancelled = [job for job in self._jobs.values() if not job.demand]
        for job in cancelled:
            job.valid = False
            del self._jobs[job.block]
        return cancelled
