"""Expert memory: the GPU cache's preallocated slots and the experts' pinned host copies.

SlotPool is one device buffer of the cache's budget (plus at most ALIGN bytes of padding per
block), allocated once: blocks are placed first-fit and never grow it. Blocks of one size (whole
experts, or equal parts) always find a gap while the cache's byte count says they fit. Unequal
parts (MoEpic) can leave the free bytes split into gaps too small for the next block: then the
blocks between the consecutive gaps that together hold it (the run with the fewest bytes between)
slide down to join them, device to device on the copy stream, through a staging buffer made with
the pool (at most 64 MiB, and only when sizes differ). Any block may slide, resident, pinned by the
running layer or half copied, so a block fits here exactly when the simulator's cache (sim.cache:
one byte count against the budget) says it does, and both engines decide alike. Slides are real
work the simulator does not model, so they are counted (`compactions`, `moved_bytes`).

HostExperts holds every expert's weights in pinned host memory, or, when host memory is short,
`sources` pinned buffers that experts of the same layer shape share round-robin: a copy's speed
does not depend on which host buffer it reads, and the values are random anyway.
"""
from __future__ import annotations

import bisect

import torch

from policies.base import Block
from realrun.backend import Backend, Event
from traces import ModelSpec

ALIGN = 256  # bytes: slot starts aligned for wide loads
STAGING_BYTES = 64 << 20  # at most: a block slides down through it in pieces


def aligned(nbytes: int) -> int:
    """The bytes a block of `nbytes` takes in a pool (its start aligned)."""
    return -(-int(nbytes) // ALIGN) * ALIGN


class SlotPool:
    def __init__(self, backend: Backend, capacity_bytes: int, block_sizes: set[int]):
        """block_sizes: the bytes of every block the pool will hold (whole experts, or each part)."""
        self.backend = backend
        self.capacity_bytes = int(capacity_bytes)
        max_blocks = self.capacity_bytes // max(1, min(block_sizes))
        self.arena_bytes = self.capacity_bytes + ALIGN * (max_blocks + 1)
        self.buffer = backend.empty(self.arena_bytes)
        # Only blocks of unequal sizes can fragment, and only they need room to slide through.
        unequal = len({aligned(n) for n in block_sizes}) > 1
        self._staging = backend.empty(min(STAGING_BYTES, max(block_sizes))) if unequal else None
        self._free: list[tuple[int, int]] = [(0, self.arena_bytes)]  # (offset, size), sorted, coalesced
        self._where: dict[Block, tuple[int, int]] = {}  # block -> (offset, nbytes)
        self.moved: Event | None = None  # slides that compute must wait for before reading a slot
        # A copy into memory another block gave up waits only for the compute that last read that
        # block, not for compute launched since: prefetches overlap the running layer, as simulated.
        self._last_read: dict[Block, Event] = {}
        self._released: list[tuple[int, int, Event]] = []  # (start, end, last read) of freed places
        self._waits: dict[Block, list[Event]] = {}
        self.compactions = 0
        self.moved_bytes = 0

    def __contains__(self, block: Block) -> bool:
        return block in self._where

    def alloc(self, block: Block, nbytes: int) -> None:
        """Place a block in the first gap large enough; when there is none, slide blocks down first.
        The arena holds every block's padding, so this succeeds whenever the cache's budget does."""
        size = aligned(nbytes)
        i = next((i for i, (_, free) in enumerate(self._free) if free >= size), None)
        if i is None:
            i = self._compact(size)
        offset, free = self._free[i]
        if free == size:
            del self._free[i]
        else:
            self._free[i] = (offset + size, free - size)
        self._where[block] = (offset, int(nbytes))
        self._released = [r for r in self._released if not r[2].query()]
        self._waits[block] = [e for lo, hi, e in self._released if lo < offset + size and offset < hi]

    def read_by(self, blocks: list[Block], event: Event) -> None:
        """Compute launched so far (ending with `event`) read these blocks."""
        for block in blocks:
            self._last_read[block] = event

    def take_waits(self, block: Block) -> list[Event]:
        """What a copy into the block's place must wait for: the last readers of what was there."""
        return self._waits.pop(block, [])

    def _compact(self, size: int) -> int:
        """Join the run of consecutive gaps that holds `size` bytes with the fewest bytes of blocks
        between them, by sliding those blocks down; returns the joined gap's index in the free list.
        The slides run on the copy stream after every copy issued so far (a half-copied block moves
        with the bytes it has) and after all compute launched so far (a block being read keeps its
        bytes until the read ends); compute waits for `moved` before reading any block."""
        i, j = self._cheapest_run(size)
        start, end = self._free[i][0], self._free[j][0]
        cursor, moves = start, []
        for block, (offset, nbytes) in sorted(self._where.items(), key=lambda item: item[1][0]):
            if start < offset < end:
                moves.append((offset, cursor, nbytes))
                self._where[block] = (cursor, nbytes)
                cursor += aligned(nbytes)
        self._free[i: j + 1] = [(cursor, sum(free for _, free in self._free[i: j + 1]))]
        backend = self.backend
        with backend.on_copy():
            backend.copy_waits_for(backend.record_compute())
            for src, dst, nbytes in moves:
                self._move(src, dst, nbytes)
            self.moved = backend.record_copy()
        # Every earlier read and copy is now behind the slides on the copy stream.
        self._last_read.clear()
        self._released.clear()
        self._waits.clear()
        self.compactions += 1
        self.moved_bytes += sum(n for _, _, n in moves)
        return i

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
            raise RuntimeError(f"{size:,} bytes asked of a pool with fewer free: the cache let blocks past "
                               "the pool's arena (a bug)")
        return best[1], best[2]

    def _move(self, src: int, dst: int, nbytes: int) -> None:
        """Copy down (dst < src) through the staging buffer: safe where the two ranges overlap."""
        staging = self._staging
        for done in range(0, nbytes, len(staging)):
            n = min(len(staging), nbytes - done)
            staging[:n].copy_(self.buffer[src + done: src + done + n], non_blocking=True)
            self.buffer[dst + done: dst + done + n].copy_(staging[:n], non_blocking=True)

    def free(self, block: Block) -> None:
        offset, nbytes = self._where.pop(block)
        size = aligned(nbytes)
        self._waits.pop(block, None)
        last_read = self._last_read.pop(block, None)
        if last_read is not None:
            self._released.append((offset, offset + size, last_read))
        i = bisect.bisect_left(self._free, (offset, 0))
        if i < len(self._free) and offset + size == self._free[i][0]:
            size += self._free.pop(i)[1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:
            offset, size = self._free[i - 1][0], self._free[i - 1][1] + size
            i -= 1
            del self._free[i]
        self._free.insert(i, (offset, size))

    def view(self, block: Block) -> torch.Tensor:
        """The block's bytes on the device."""
        offset, nbytes = self._where[block]
        return self.buffer[offset: offset + nbytes]

    def allocated_bytes(self) -> int:
        return sum(n for _, n in self._where.values())


def random_bf16(generator: torch.Generator, numel: int) -> torch.Tensor:
    """Small random bf16 values on the generator's device (not zeros: some kernels run faster on zeros)."""
    return (torch.randn(numel, generator=generator, device=generator.device) * 0.02).to(torch.bfloat16)


class HostExperts:
    """Pinned host copies of the experts of `num_layers` layers."""

    PATTERN_ELEMENTS = 1 << 20  # a random pattern tiled over each buffer: filling GBs stays fast

    def __init__(self, backend: Backend, model: ModelSpec, sources: int = 0, seed: int = 0, fill: bool = True):
        self.model = model
        self.num_experts_total = model.num_layers * model.num_experts
        self.shared = 0 < sources < self.num_experts_total
        count = sources if self.shared else self.num_experts_total
        generator = torch.Generator().manual_seed(seed)
        numel = model.bytes_per_expert // 2
        self.buffers = []
        for i in range(count):
            buffer = backend.pinned(model.bytes_per_expert)
            self.buffers.append(buffer)
            if not fill:
                continue
            pattern = random_bf16(generator, min(self.PATTERN_ELEMENTS, numel))
            values = buffer[: numel * 2].view(torch.bfloat16)
            for start in range(0, numel, len(pattern)):
                chunk = values[start: start + len(pattern)]
                chunk.copy_(pattern[: len(chunk)])

    @property
    def pinned_bytes(self) -> int:
        return sum(b.numel() for b in self.buffers)

    def expert(self, layer: int, expert: int) -> torch.Tensor:
        index = layer * self.model.num_experts + expert
        return self.buffers[index % len(self.buffers)]

    def block(self, block: Block, part_bytes: list[int]) -> torch.Tensor:
        """The host bytes of one block: part p is the p-th slice of its expert."""
        layer, expert, part = block
        start = sum(part_bytes[:part])
        return self.expert(layer, expert)[start: start + part_bytes[part]]

    def describe(self) -> str:
        if self.shared:
            return (f"{len(self.buffers)} pinned host buffers shared round-robin by {self.num_experts_total} experts "
                    "(copy speed does not depend on the source)")
        return f"every expert in its own pinned host buffer ({self.num_experts_total})"
