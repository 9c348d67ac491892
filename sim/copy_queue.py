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
    """Jobs by (-priority, rank, order queued). A plan's prefetches may also be queued as one batch
    (push_batch): its entries are made into jobs only as the queue reaches them (or one is asked
    for by block), each in the place its own push() would have given it; a replanning policy queues
    hundreds of blocks after every layer, of which the link copies a few before the next plan."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, float, int, CopyJob]] = []
        self._jobs: dict[Block, CopyJob] = {}
        self._seq = itertools.count()
        self._batch: dict[Block, int] = {}  # block -> its index in the batch, until made into a job
        self._batch_blocks: list[Block] = []
        self._batch_priorities: list[float] = []
        self._batch_at = 0  # entries before it are jobs or dropped
        self._batch_seq = 0  # the order queued of the batch's first entry
        self._make_job: Callable[[Block, float], CopyJob] | None = None

    def __len__(self) -> int:
        return len(self._jobs) + len(self._batch)

    def __contains__(self, block: Block) -> bool:
        return block in self._jobs or block in self._batch

    def get(self, block: Block) -> CopyJob | None:
        if block in self._batch:
            self._take(self._batch[block])
        return self._jobs.get(block)

    def jobs(self) -> list[CopyJob]:
        """The queued jobs, in the order they were queued (a batch's after those queued one by one)."""
        for i in list(self._batch.values()):
            self._take(i)
        return list(self._jobs.values())

    def blocks(self) -> Iterable[Block]:
        """The blocks of the queued jobs (not those of a batch)."""
        return self._jobs.keys()

    def holds_prefetches(self) -> bool:
        return bool(self._batch) or any(not job.demand for job in self._jobs.values())

    def push(self, block: Block, priority: float, nbytes: int, chunks: int = 1, rank: float = 0.0) -> CopyJob:
        """Queue a copy; a block already queued keeps one job, at the higher of the two priorities."""
        if block in self._batch:
            self._take(self._batch[block])
        job = self._jobs.get(block)
        if job is not None:
            if priority > job.priority:
                self._reprioritise(job, priority, rank)
            return job
        job = CopyJob(block, priority, nbytes, chunks, chunks, rank=rank)
        self._jobs[block] = job
        heapq.heappush(self._heap, (-priority, rank, next(self._seq), job))
        return job

    def push_batch(self, blocks: list[Block], priorities: list[float], live: dict[Block, int],
                   make_job: Callable[[Block, float], CopyJob]) -> None:
        """Queue blocks[i] at priorities[i] (rank 0) for each i in live ({block: i}), as push() in
        turn would, onto a queue holding no prefetch (and no batch): the blocks are distinct, not
        queued, and in descending priority. make_job(block, priority) makes a job when it is needed."""
        self._batch, self._batch_blocks, self._batch_priorities = live, blocks, priorities
        self._batch_at = 0
        self._batch_seq = next(self._seq)
        self._seq = itertools.count(self._batch_seq + len(blocks))
        self._make_job = make_job

    def _take(self, i: int) -> None:
        """Make the batch's entry i a queued job, in the place its order queued gives it."""
        block, priority = self._batch_blocks[i], self._batch_priorities[i]
        del self._batch[block]
        job = self._jobs[block] = self._make_job(block, priority)
        heapq.heappush(self._heap, (-priority, 0.0, self._batch_seq + i, job))

    def _take_head(self) -> None:
        """Make the batch's first entry a job if it goes before every queued job."""
        blocks, batch, i = self._batch_blocks, self._batch, self._batch_at
        while blocks[i] not in batch:
            i += 1
        self._batch_at = i
        heap = self._heap
        if not heap or (-self._batch_priorities[i], 0.0, self._batch_seq + i) < heap[0][:3]:
            self._take(i)

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
        if self._batch:
            self._take_head()
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

    def batched(self) -> int:
        """How many of a batch's entries are queued but not yet made into jobs."""
        return len(self._batch)

    def cancel_prefetches(self) -> list[CopyJob]:
        """Drop every queued prefetch, a batch's included; returns the jobs (started ones hold memory
        the caller must release), not a batch's entries that were never made into jobs (batched())."""
        cancelled = [job for job in self._jobs.values() if not job.demand]
        for job in cancelled:
            job.valid = False
            del self._jobs[job.block]
        self._batch = {}
        return cancelled
