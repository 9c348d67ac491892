"""Expert memory: the GPU cache's preallocated slots and the experts' pinned host copies.

SlotPool is one device buffer of the cache's budget (plus at most ALIGN bytes of padding per
block), allocated once: blocks are placed first-fit and never grow it. Blocks of one size (whole
experts, or equal parts) always fit while the cache's byte count says they do. Unequal parts
(MoEpic) can fragment it: then the resident blocks no layer is using slide down, on the copy
stream (device to device, through a small staging buffer), to join the gaps; such moves are
real work the simulator does not model, so they are counted (`compactions`, `moved_bytes`).

HostExperts holds every expert's weights in pinned host memory, or, when host memory is short,
`sources` pinned buffers that experts of the same layer shape share round-robin: a copy's speed
does not depend on which host buffer it reads, and the values are random anyway.
"""
from __future__ import annotations

import bisect
from typing import Callable

import torch

from policies.base import Block
from realrun.backend import Backend, Event
from traces import ModelSpec

ALIGN = 256  # bytes: slot starts aligned for wide loads


def _aligned(nbytes: int) -> int:
    return -(-int(nbytes) // ALIGN) * ALIGN


class FragmentedError(RuntimeError):
    pass


STAGING_BYTES = 64 << 20


class SlotPool:
    def __init__(self, backend: Backend, capacity_bytes: int, smallest_block_bytes: int):
        self.backend = backend
        self.capacity_bytes = int(capacity_bytes)
        max_blocks = self.capacity_bytes // max(1, int(smallest_block_bytes))
        self.arena_bytes = self.capacity_bytes + ALIGN * (max_blocks + 1)
        self.buffer = backend.empty(self.arena_bytes)
        self._free: list[tuple[int, int]] = [(0, self.arena_bytes)]  # (offset, size), sorted, coalesced
        self._where: dict[Block, tuple[int, int]] = {}  # block -> (offset, nbytes)
        self.reads_done: Event | None = None  # the compute that last read any block (compaction waits for it)
        self.moved: Event | None = None  # moves that compute must wait for before reading a slot
        # A copy into memory another block gave up waits only for the compute that last read that
        # block, not for compute launched since: prefetches overlap the running layer, as simulated.
        self._last_read: dict[Block, Event] = {}
        self._released: list[tuple[int, int, Event]] = []  # (start, end, last read) of freed places
        self._waits: dict[Block, list[Event]] = {}
        self.compactions = 0
        self.moved_bytes = 0
        self._staging: torch.Tensor | None = None

    def __contains__(self, block: Block) -> bool:
        return block in self._where

    def alloc(self, block: Block, nbytes: int, movable: Callable[[Block], bool] = lambda b: False) -> None:
        """Place a block; when no gap is large enough, slide the `movable` blocks down first."""
        size = _aligned(nbytes)
        if not self._place(block, size, nbytes):
            self._compact(movable)
            if not self._place(block, size, nbytes):
                raise FragmentedError(f"the expert cache's memory is fragmented around blocks in use: no "
                                      f"contiguous {size:,} bytes for {block} even after compaction")

    def _place(self, block: Block, size: int, nbytes: int) -> bool:
        for i, (offset, free) in enumerate(self._free):
            if free >= size:
                if free == size:
                    del self._free[i]
                else:
                    self._free[i] = (offset + size, free - size)
                self._where[block] = (offset, int(nbytes))
                self._released = [r for r in self._released if not r[2].query()]
                self._waits[block] = [e for lo, hi, e in self._released if lo < offset + size and offset < hi]
                return True
        return False

    def read_by(self, blocks: list[Block], event: Event) -> None:
        """Compute launched so far (ending with `event`) read these blocks."""
        for block in blocks:
            self._last_read[block] = event
        self.reads_done = event

    def take_waits(self, block: Block) -> list[Event]:
        """What a copy into the block's place must wait for: the last readers of what was there."""
        return self._waits.pop(block, [])

    def _compact(self, movable: Callable[[Block], bool]) -> None:
        """Slide movable blocks down, in address order, past no block in use (pinned or in flight)."""
        placed = sorted(self._where.items(), key=lambda item: item[1][0])
        fixed = [offset for block, (offset, _) in placed if not movable(block)]
        backend, cursor, moves = self.backend, 0, []
        for block, (offset, nbytes) in placed:
            size = _aligned(nbytes)
            if movable(block):
                limit = next((f for f in fixed if f >= cursor), self.arena_bytes)
                if offset > cursor and cursor + size <= limit:
                    moves.append((offset, cursor, nbytes))
                    self._where[block] = (cursor, nbytes)
                    offset = cursor
            cursor = offset + size
        if not moves:
            return
        with backend.on_copy():
            backend.copy_waits_for(self.reads_done)  # compute may still read the old places
            for src, dst, nbytes in moves:
                self._move(src, dst, nbytes)
            self.moved = backend.record_copy()
        ends = sorted((o, o + _aligned(n)) for o, n in self._where.values())
        self._free, start = [], 0
        for begin, end in ends + [(self.arena_bytes, self.arena_bytes)]:
            if begin > start:
                self._free.append((start, begin - start))
            start = max(start, end)
        self.compactions += 1
        self.moved_bytes += sum(n for _, _, n in moves)

    def _move(self, src: int, dst: int, nbytes: int) -> None:
        """Copy down (dst < src) through a staging buffer: safe where the two ranges overlap."""
        if self._staging is None:
            self._staging = self.backend.empty(STAGING_BYTES)
        for done in range(0, nbytes, STAGING_BYTES):
            n = min(STAGING_BYTES, nbytes - done)
            self._staging[:n].copy_(self.buffer[src + done: src + done + n], non_blocking=True)
            self.buffer[dst + done: dst + done + n].copy_(self._staging[:n], non_blocking=True)

    def free(self, block: Block) -> None:
        offset, nbytes = self._where.pop(block)
        size = _aligned(nbytes)
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
