"""Unit tests of the engine-neutral core on hand-built cases: the copy queue's order, the cache's byte
accounting, the copy scheduler's admission (through a scripted transport that lands chunks only when
told) and the layer protocol's classification. Each expected value is worked out by hand here."""
from __future__ import annotations

import numpy as np
import pytest

from policies.base import DEMAND_PRIORITY, Policy
from policies.victims import ranked
from sim.cache import ExpertCache
from sim.copy_queue import CopyJob, CopyQueue
from sim.copy_scheduler import CopyScheduler
from sim.errors import PolicyError
from sim.layer_protocol import start_layer
from sim.metrics import Recorder

MB = 100  # bytes of one block in these tests


class Lowest(Policy):
    """Evicts the lowest block first (the base order), and logs what it hears of its copies."""

    def __init__(self, chunks: int = 1):
        self.copy_chunks = chunks
        self.done, self.cancelled = [], []

    def on_copy_done(self, block, prefetched):
        self.done.append((block, prefetched))

    def on_copy_cancelled(self, block):
        self.cancelled.append(block)


class Scripted:
    """A transport that only records which copy started; the test lands chunks by hand."""

    def __init__(self):
        self.started, self.arrived = [], []

    def start(self, job):
        self.started.append(job.block)

    def after_slides(self, job, nbytes):
        raise AssertionError("ExpertCache never slides")

    def landed(self, block):
        self.arrived.append(block)


def scheduler(capacity_blocks: int, chunks: int = 1):
    cache = ExpertCache(capacity_blocks * MB, lambda block: MB)
    policy = Lowest(chunks)
    link = CopyScheduler(0, [cache], policy, Recorder(4))
    link.transport = Scripted()
    return link, cache, policy


def resident(cache: ExpertCache, *blocks) -> None:
    for b in blocks:
        cache.reserve(b)
        cache.commit(b, prefetched=False)


# --- the copy queue ---

def test_the_queue_serves_demand_then_higher_priority_then_lower_rank_then_first_queued():
    q = CopyQueue()
    q.push((1, 0, 0), 0.2, MB)
    q.push((1, 1, 0), 0.7, MB)
    q.push((0, 5, 0), DEMAND_PRIORITY, MB, rank=2)
    q.push((0, 3, 0), DEMAND_PRIORITY, MB, rank=1)
    q.push((1, 2, 0), 0.7, MB)
    order = [q.pop().block for _ in range(len(q))]
    assert order == [(0, 3, 0), (0, 5, 0), (1, 1, 0), (1, 2, 0), (1, 0, 0)]
    assert q.pop() is None


def test_a_block_queued_twice_is_one_job_at_the_higher_priority():
    q = CopyQueue()
    q.push((1, 0, 0), 0.1, MB)
    q.push((1, 1, 0), 0.5, MB)
    q.push((1, 0, 0), 0.9, MB)
    q.push((1, 1, 0), 0.2, MB)  # lower: no change
    assert len(q) == 2
    assert [(j.block, j.priority) for j in (q.pop(), q.pop())] == [((1, 0, 0), 0.9), ((1, 1, 0), 0.5)]


def test_cancelling_prefetches_keeps_the_demands():
    q = CopyQueue()
    q.push((1, 0, 0), 0.3, MB)
    q.push((0, 1, 0), DEMAND_PRIORITY, MB)
    q.push((1, 2, 0), 0.8, MB)
    assert sorted(j.block for j in q.cancel_prefetches()) == [(1, 0, 0), (1, 2, 0)]
    assert [j.block for j in q.jobs()] == [(0, 1, 0)]
    assert q.pop().block == (0, 1, 0) and q.peek() is None



def test_a_batch_is_served_as_its_blocks_pushed_one_by_one_would_be():
    """push_batch makes its jobs only as the queue reaches them; pushes, a demand for a batched
    block, a lookup and a requeue in between give the order of the same pushes made one by one."""
    def script(q, batched):
        q.push((0, 1, 0), DEMAND_PRIORITY, MB, rank=1)
        blocks = [(2, 0, 0), (2, 1, 0), (0, 1, 0), (2, 2, 0), (3, 0, 0)]
        priorities = [0.9, 0.5, 0.5, 0.5, 0.1]
        if batched:
            live = {b: i for i, b in enumerate(blocks) if b != (0, 1, 0)}
            q.push_batch(blocks, priorities, live, lambda b, p: CopyJob(b, p, MB, 1, 1))
        else:
            for b, p in zip(blocks, priorities):
                q.push(b, p, MB)
        q.push((3, 1, 0), 0.5, MB)  # after the batch among equals
        first = q.pop()
        q.push((2, 2, 0), DEMAND_PRIORITY, MB, rank=0)  # a batched prefetch becomes a demand
        assert q.get((3, 0, 0)).priority == 0.1 and len(q) == 5
        q.requeue(first)
        return [first.block] + [q.pop().block for _ in range(len(q))]

    assert script(CopyQueue(), True) == script(CopyQueue(), False) == \
        [(0, 1, 0), (2, 2, 0), (0, 1, 0), (2, 0, 0), (2, 1, 0), (3, 1, 0), (3, 0, 0)]


def test_cancelling_a_batch_counts_its_entries_never_made_into_jobs():
    q = CopyQueue()
    blocks = [(1, 0, 0), (1, 1, 0), (1, 2, 0)]
    q.push_batch(blocks, [0.3, 0.2, 0.1], {b: i for i, b in enumerate(blocks)}, lambda b, p: CopyJob(b, p, MB, 1, 1))
    assert q.peek().block == (1, 0, 0) and q.batched() == 2
    assert [j.block for j in q.cancel_prefetches()] == [(1, 0, 0)] and q.batched() == 0
    assert q.peek() is None and len(q) == 0


def test_ranked_takes_the_first_victim_as_the_full_order_does():
    """policies.victims.ranked: the first victim found by narrowing equals the head of the sorted
    order, ties among equal keys going to the lowest block; a NaN key leaves it to the sort."""
    cache = ExpertCache(100 * MB, lambda block: MB)
    blocks = [(layer, expert, part) for layer in range(3) for expert in range(4) for part in range(2)]
    for b in reversed(blocks):
        cache.reserve(b)
        cache.commit(b, prefetched=False)
    cache.pin((0, 0, 0))  # not evictable
    rng = np.random.default_rng(1)
    for trial in range(30):
        score = rng.integers(0, 3, size=(3, 4)).astype(np.float64)
        if trial % 5 == 4:
            score[2, 3] = np.nan
        used = rng.integers(0, 2, size=(3, 4)) > 0

        def rank(layers, experts, parts):
            return used[layers, experts], score[layers, experts]

        expected = sorted((b for b in blocks if b != (0, 0, 0)),
                          key=lambda b: (used[b[0], b[1]], np.isnan(score[b[0], b[1]]),
                                         np.nan_to_num(score[b[0], b[1]]), b))
        assert list(ranked(cache, rank)) == expected
        assert next(ranked(cache, rank)) == expected[0]

# --- the cache ---

def test_the_cache_counts_bytes_in_flight_resident_and_wasted():
    cache = ExpertCache(3 * MB, lambda block: MB)
    cache.reserve((0, 0, 0))
    cache.reserve((0, 1, 0))
    assert (cache.free_bytes(), cache.resident_bytes, cache.evictable_bytes()) == (MB, 0, 0)
    cache.commit((0, 0, 0), prefetched=True)
    cache.cancel((0, 1, 0), copied_bytes=40)  # a prefetch abandoned after 40 bytes
    assert (cache.free_bytes(), cache.resident_bytes, cache.wasted_prefetch_bytes) == (2 * MB, MB, 40)
    cache.pin((0, 0, 0))
    assert cache.evictable_bytes() == 0 and not cache.is_evictable((0, 0, 0))
    with pytest.raises(PolicyError, match="not evictable"):
        cache.evict((0, 0, 0))
    cache.unpin((0, 0, 0))
    cache.evict((0, 0, 0))  # never used: its bytes were a wasted prefetch
    assert (cache.free_bytes(), cache.wasted_prefetch_bytes, cache.evictions, cache.high_water_bytes) == (3 * MB, 140, 1, 2 * MB)


def test_the_resident_table_and_grid_made_at_the_first_call_match_those_kept_from_the_start():
    """A cache keeps its resident table and part-0 grid from the first call for them on; made late,
    they hold what they would have held (columns in another order), and stay in step after."""
    early, late = ExpertCache(10 * MB, lambda block: MB), ExpertCache(10 * MB, lambda block: MB)
    early.resident_table()

    def columns(cache):
        table, evictable = cache.resident_table()
        return sorted(zip(*table.tolist(), evictable.tolist()))

    layers, experts = np.array([0, 0, 1, 2, 2]), np.array([0, 1, 2, 0, 3])
    for cache in (early, late):
        resident(cache, (0, 0, 0), (0, 1, 0), (1, 2, 0), (1, 2, 1), (2, 0, 0))
        cache.pin((0, 1, 0))
        cache.pin((1, 2, 1))
        cache.evict((0, 0, 0))
        cache.unpin((1, 2, 1))
        cache.reserve((2, 3, 0))  # in flight: not resident
    assert columns(late) == columns(early) and len(columns(late)) == 4
    assert late.resident_mask(layers, experts).tolist() == early.resident_mask(layers, experts).tolist() == \
        [False, True, True, True, False]
    for cache in (early, late):
        cache.commit((2, 3, 0), prefetched=False)
        cache.unpin((0, 1, 0))
        cache.evict((1, 2, 0))
    assert columns(late) == columns(early) and all(e for *_, e in columns(late))
    assert late.resident_mask(layers, experts).tolist() == [False, True, False, True, True]


def test_admission_evicts_the_policys_order_only_as_far_as_needed_and_never_a_pinned_block():
    cache = ExpertCache(3 * MB, lambda block: MB)
    resident(cache, (0, 2, 0), (0, 0, 0), (0, 1, 0))
    cache.pin((0, 0, 0))
    assert cache.admit((1, 0, 0), Lowest(), demand=True)
    assert sorted(cache.resident_blocks()) == [(0, 0, 0), (0, 2, 0)]  # (0, 1, 0): lowest evictable
    cache.pin((0, 2, 0))
    cache.reserve((1, 0, 0))
    assert not cache.admit((1, 1, 0), Lowest(), demand=True)  # all pinned or in flight: wait


# --- the copy scheduler ---

def test_one_copy_at_a_time_in_queue_order_each_landing_starts_the_next():
    link, cache, policy = scheduler(4)
    link.fetch((1, 0, 0), 0.5)
    link.fetch((1, 1, 0), 0.9)  # queued behind the copy already on the link
    link.fetch((0, 3, 0), DEMAND_PRIORITY)
    assert link.transport.started == [(1, 0, 0)]
    link.chunk_landed()
    link.chunk_landed()
    link.chunk_landed()
    assert link.transport.started == [(1, 0, 0), (0, 3, 0), (1, 1, 0)]
    assert policy.done == [((1, 0, 0), True), ((0, 3, 0), False), ((1, 1, 0), True)]
    assert link.current is None and cache.resident_bytes == 3 * MB
    assert (link.recorder.prefetches_requested, link.recorder.demand_bytes) == (2, MB)


def test_a_prefetch_without_room_is_dropped_and_the_policy_hears_of_it():
    link, cache, policy = scheduler(1)
    resident(cache, (0, 0, 0))
    cache.pin((0, 0, 0))  # the running layer holds the only slot
    link.fetch((1, 0, 0), 0.5)
    assert link.transport.started == [] and policy.cancelled == [(1, 0, 0)]
    assert link.recorder.prefetches_dropped == 1 and len(link.queue) == 0


def test_a_demand_without_room_waits_until_an_unpin_and_a_kick():
    link, cache, policy = scheduler(1)
    resident(cache, (0, 0, 0))
    cache.pin((0, 0, 0))
    link.fetch((0, 1, 0), DEMAND_PRIORITY)
    assert link.blocked and link.transport.started == []
    cache.unpin((0, 0, 0))
    link.kick()
    assert not link.blocked and link.transport.started == [(0, 1, 0)]
    assert not cache.holds((0, 0, 0)) and cache.is_in_flight((0, 1, 0))


def test_a_demand_preempts_a_chunked_prefetch_between_chunks_which_then_resumes():
    link, cache, policy = scheduler(4, chunks=2)
    link.fetch((1, 0, 0), 0.5)
    link.fetch((0, 2, 0), DEMAND_PRIORITY)
    link.chunk_landed()  # half the prefetch landed; the demand goes next
    link.chunk_landed()  # the demand's first chunk
    link.chunk_landed()  # its second: resident
    link.chunk_landed()  # the prefetch's second half
    assert link.transport.started == [(1, 0, 0), (0, 2, 0), (0, 2, 0), (1, 0, 0)]
    assert link.transport.arrived == [(0, 2, 0), (1, 0, 0)]
    assert cache.is_resident((1, 0, 0)) and cache.used_bytes == 2 * MB


def test_replacing_a_plan_releases_the_memory_of_a_half_copied_prefetch():
    link, cache, policy = scheduler(2, chunks=2)
    link.fetch((1, 0, 0), 0.5)
    link.fetch((0, 2, 0), DEMAND_PRIORITY)
    link.chunk_landed()  # the prefetch is parked half copied, its memory reserved
    link.cancel_prefetches()
    assert policy.cancelled == [(1, 0, 0)] and not cache.holds((1, 0, 0))
    assert cache.wasted_prefetch_bytes == MB // 2 and link.recorder.prefetches_cancelled == 1


# --- the layer protocol ---

def test_a_layer_classifies_hit_late_and_miss_pins_them_and_demands_the_misses_in_compute_order():
    link, cache, policy = scheduler(8)
    resident(cache, (0, 0, 0))
    link.fetch((0, 1, 0), 0.5)  # on the link: late when the layer needs it
    link.fetch((0, 2, 0), 0.4)  # queued: late too
    rec = link.recorder
    blocks, order = start_layer(0, (3, 1, 0, 2), [0, 0, 0, 0], 1, [cache], [link], rec, policy, MB, None, 4,
                                lambda layer, expert: 0)
    assert blocks == [[(0, 3, 0)], [(0, 1, 0)], [(0, 0, 0)], [(0, 2, 0)]]
    assert (rec.hits[0], rec.late[0], rec.misses[0], rec.uses[0]) == (1, 2, 1, 4)
    assert order == [0, 1, 2, 3]  # index order (transformers' loop) unless the policy asks otherwise
    assert all(cache.pin_count(b[0]) == 1 for b in blocks)
    assert cache.running_layer is not None and link.queue.get((0, 3, 0)).demand
    assert link.queue.get((0, 2, 0)).demand  # a queued prefetch the layer needs becomes a demand
