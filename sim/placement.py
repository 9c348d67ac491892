"""Where blocks sit in a GPU's expert cache: one preallocated arena, first fit, compaction.

The cache's byte count (sim.cache) says whether a block fits; this says where. Blocks of one size
(whole experts, equal parts) always find a gap when the byte count says they fit. Unequal parts
(MoEpic) can leave the free bytes split into gaps too small for the next block: then the blocks
between the consecutive gaps that together hold it (the run with the fewest bytes between) slide
down to join them. realrun's SlotPool does those slides on the GPU; the simulator charges their
time (sim.link: after the compute in flight, at device-memory speed, and compute waits for them).
"""
from __future__ import annotations

import bisect
from typing import Callable

from policies.base import Block
from sim.cache import ExpertCache

ALIGN = 256  # bytes: slot starts aligned for wide loads


def aligned(nbytes: int) -> int:
    """The bytes a block of `nbytes` takes in an arena (its start aligned)."""
    return -(-int(nbytes) // ALIGN) * ALIGN


def fragments(block_sizes: set[int]) -> bool:
    """Whether blocks of these sizes can leave gaps too small for the next one."""
    return len({aligned(n) for n in block_sizes}) > 1


class Placement:
    def __init__(self, capacity_bytes: int, block_sizes: set[int]):
        """block_sizes: the bytes of every block the arena will hold (whole experts, or each part)."""
        self.capacity_bytes = int(capacity_bytes)
        max_blocks = self.capacity_bytes // max(1, min(block_sizes))
        self.arena_bytes = self.capacity_bytes + ALIGN * (max_blocks + 1)  # every block's padding fits
        self._free: list[tuple[int, int]] = [(0, self.arena_bytes)]  # (offset, size), sorted, coalesced
        self._where: dict[Block, tuple[int, int]] = {}  # block -> (offset, nbytes)
        self.compactions = 0
        self.moved_bytes = 0

    def __contains__(self, block: Block) -> bool:
        return block in self._where

    def place(self, block: Block, nbytes: int) -> list[tuple[int, int, int]]:
        """Put a block in the first gap large enough, sliding blocks down first when there is none.
        Returns the slides (from offset, to offset, bytes), in order; none when a gap was found."""
        size = aligned(nbytes)
        i = next((i for i, (_, free) in enumerate(self._free) if free >= size), None)
        moves = []
        if i is None:
            i, moves = self._compact(size)
        offset, free = self._free[i]
        if free == size:
            del self._free[i]
        else:
            self._free[i] = (offset + size, free - size)
        self._where[block] = (offset, int(nbytes))
        return moves

    def _compact(self, size: int) -> tuple[int, list[tuple[int, int, int]]]:
        """Join the run of consecutive gaps that holds `size` bytes with the fewest bytes of blocks
        between them; returns the joined gap's index in the free list and the slides."""
        i, j = self._cheapest_run(size)
        start, end = self._free[i][0], self._free[j][0]
        cursor, moves = start, []
        for block, (offset, nbytes) in sorted(self._where.items(), key=lambda item: item[1][0]):
            if start < offset < end:
                moves.append((offset, cursor, nbytes))
                self._where[block] = (cursor, nbytes)
                cursor += aligned(nbytes)
        self._free[i: j + 1] = [(cursor, sum(free for _, free in self._free[i: j + 1]))]
        self.compactions += 1
        self.moved_bytes += sum(n for _, _, n in moves)
        return i, moves

    def _cheapest_run(self, size: int) -> tuple[int, int]:
        """Gaps i..j of the free list: together at least `size` bytes, with the fewest bytes of
        blocks between them (for each last gap j, the shortest run ending there is the cheapest)."""
        best, i, free = None, 0, 0
        for j, (offset, gap) in enumerate(self._free):
            free += gap
            while free - self._free[i][1] >= size:
                free -= self._free[i][1]
                i += 1
            if free >= size:
                first_end = self._free[i][0] + self._free[i][1]
                between = offset - first_end - (free - self._free[i][1] - gap)
                if best is None or between < best[0]:
                    best = (between, i, j)
        if best is None:
            raise RuntimeError(f"{size:,} bytes asked of an arena with fewer free: the cache let blocks past "
                               "the arena (a bug)")
        return best[1], best[2]

    def free(self, block: Block) -> tuple[int, int]:
        """Give the block's place back; returns it (offset, bytes taken)."""
        offset, nbytes = self._where.pop(block)
        place = (offset, aligned(nbytes))
        size = place[1]
        i = bisect.bisect_left(self._free, (offset, 0))
        if i < len(self._free) and offset + size == self._free[i][0]:
            size += self._free.pop(i)[1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:
            offset, size = self._free[i - 1][0], self._free[i - 1][1] + size
            i -= 1
            del self._free[i]
        self._free.insert(i, (offset, size))
        return place

    def where(self, block: Block) -> tuple[int, int]:
        """(offset, bytes) of a placed block."""
        return self._where[block]

    def allocated_bytes(self) -> int:
        return sum(n for _, n in self._where.values())


class PlacedCache(ExpertCache):
    """The cache with each reserved block placed (`pool`: a Placement, or realrun's SlotPool, which
    also holds the bytes); None: bytes are only counted. `slid_bytes`: bytes slid by compaction
    since the copy engine last took them (take_slid_bytes)."""

    def __init__(self, capacity_bytes: int, block_bytes: Callable[[Block], int], pool: Placement | None = None):
        super().__init__(capacity_bytes, block_bytes)
        self.pool = pool
        self.slid_bytes = 0

    def reserve(self, block: Block) -> None:
        super().reserve(block)
        if self.pool is not None:
            self.slid_bytes += sum(n for _, _, n in self.pool.place(block, self.block_bytes(block)))

    def evict(self, block: Block) -> None:
        super().evict(block)
        if self.pool is not None:
            self.pool.free(block)

    def cancel(self, block: Block, copied_bytes: int) -> None:
        super().cancel(block, copied_bytes)
        if self.pool is not None:
            self.pool.free(block)

    def take_slid_bytes(self) -> int:
        slid, self.slid_bytes = self.slid_bytes, 0
        return slid


def slides(caches: list[PlacedCache]) -> tuple[int, int]:
    """(compactions, bytes slid) over the caches that place their blocks."""
    pools = [cache.pool for cache in caches if cache.pool is not None]
    return sum(p.compactions for p in pools), sum(p.moved_bytes for p in pools)
