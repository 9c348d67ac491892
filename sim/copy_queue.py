"""The host-to-GPU copy queue: priorities, demand before prefetch, cancellation, chunked copies.

Engine-neutral, like the cache: the simulator's link and realrun's copy engine both take the next
copy from here. Among equal priorities the lower rank goes first (a layer's demand copies are ranked
in the order its compute waits for them), then the earlier request.
"""
from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from typing import Callable, Iterable

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
    rank: float = 0.0  # among equal priorities, lower first

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
        self._heap: list[tuple[float, float, int, CopyJob]] = []
        self._jobs: dict[Block, CopyJob] = {}
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._jobs)

    def __contains__(self, block: Block) -> bool:
        return block in self._jobs

    def get(self, block: Block) -> CopyJob | None:
        return self._jobs.get(block)

    def jobs(self) -> list[CopyJob]:
        """The queued jobs, in the order they were queued."""
        return list(self._jobs.values())

    def push(self, block: Block, priority: float, nbytes: int, chunks: int = 1, rank: float = 0.0) -> CopyJob:
        """Queue a copy; a block already queued keeps one job, at the higher of the two priorities."""
        job = self._jobs.get(block)
        if job is not None:
            if priority > job.priority:
                self._reprioritise(job, priority, rank)
            return job
        job = CopyJob(block, priority, nbytes, chunks, chunks, rank=rank)
        self._jobs[block] = job
        heapq.heappush(self._heap, (-priority, rank, next(self._seq), job))
        return job

    def requeue(self, job: CopyJob) -> None:
        """Put a partly copied job back (a demand preempted it between chunks)."""
        self._jobs[job.block] = job
        job.valid = True
        heapq.heappush(self._heap, (-job.priority, job.rank, next(self._seq), job))

    def _reprioritise(self, job: CopyJob, priority: float, rank: float) -> None:
        job.valid = False
        fresh = CopyJob(job.block, priority, job.nbytes, job.chunks, job.chunks_left, job.started, source=job.source,
                        rank=rank)
        self._jobs[job.block] = fresh
        heapq.heappush(self._heap, (-priority, rank, next(self._seq), fresh))

    def peek(self) -> CopyJob | None:
        heap = self._heap
        while heap and not heap[0][3].valid:
            heapq.heappop(heap)
        return heap[0][3] if heap else None

    def pop(self) -> CopyJob | None:
        job = self.peek()
        if job is not None:
            heapq.heappop(self._heap)
            del self._jobs[job.block]
        return job

    def discard(self, job: CopyJob) -> None:
        """Drop one queued job (its memory, if started, is the caller's to release)."""
        job.valid = False
        del self._jobs[job.block]

    def push_prefetches(self, entries: Iterable[tuple[Block, float]],
                        new_job: Callable[[Block, float], CopyJob | None]) -> None:
        """push() each (block, priority) in turn, new_job(block, priority) making the job of a block
        not queued (None: none). The heap is rebuilt once, without the stale entries of jobs cancelled
        or replaced before: so new_job may hand back a cancelled job (re-validated) instead of a new one."""
        self._heap = [entry for entry in self._heap if entry[3].valid]
        jobs, heap, seq = self._jobs, self._heap, self._seq
        for block, priority in entries:
            job = jobs.get(block)
            if job is not None:
                if priority > job.priority:
                    self._reprioritise(job, priority, 0.0)
                continue
            job = new_job(block, priority)
            if job is not None:
                jobs[block] = job
                heap.append((-priority, job.rank, next(seq), job))
        heapq.heapify(heap)

    def cancel_prefetches(self) -> list[CopyJob]:
        """Drop every queued prefetch; returns them (started ones hold memory the caller must release)."""
        cancelled = [job for job in self._jobs.values() if not job.demand]
        for job in cancelled:
            job.valid = False
            del self._jobs[job.block]
        return cancelled
