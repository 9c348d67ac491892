"""Expert memory: the GPU cache's preallocated slots and the experts' pinned host copies.

SlotPool is sim.placement's arena with real bytes: one device buffer of the cache's budget (plus at
most ALIGN bytes of padding per block), allocated once, blocks placed first-fit, never grown. When
unequal parts (MoEpic) leave no gap large enough, the blocks placement slides down move device to
device on the copy stream, through a staging buffer made with the pool (at most 64 MiB, and only
when sizes differ). Any block may slide, resident, pinned by the running layer or half copied, so
a block fits here exactly when the simulator's cache (sim.cache: one byte count against the budget)
says it does, and both engines decide alike; the simulator charges the slides' time (sim.link).

HostExperts holds every expert's weights in pinned host memory, or, when host memory is short,
`sources` pinned buffers that experts of the same layer shape share round-robin: a copy's speed
does not depend on which host buffer it reads, and the values are random anyway.
"""
from __future__ import annotations

import torch

from policies.base import Block
from realrun.backend import Backend, Event
from sim.placement import Placement, aligned, fragments
from traces import ModelSpec

STAGING_BYTES = 64 << 20  # at most: a block slides down through it in pieces


class SlotPool(Placement):
    def __init__(self, backend: Backend, capacity_bytes: int, block_sizes: set[int]):
        """block_sizes: the bytes of every block the pool will hold (whole experts, or each part)."""
        super().__init__(capacity_bytes, block_sizes)
        self.backend = backend
        self.buffer = backend.empty(self.arena_bytes)
        # Only blocks of unequal sizes can fragment, and only they need room to slide through.
        self._staging = backend.empty(min(STAGING_BYTES, max(block_sizes))) if fragments(block_sizes) else None
        self.moved: Event | None = None  # slides that compute must wait for before reading a slot
        # A copy into memory another block gave up waits only for the compute that last read that
        # block, not for compute launched since: prefetches overlap the running layer, as simulated.
        self._last_read: dict[Block, Event] = {}
        self._released: list[tuple[int, int, Event]] = []  # (start, end, last read) of freed places
        self._waits: dict[Block, list[Event]] = {}

    def place(self, block: Block, nbytes: int) -> list[tuple[int, int, int]]:
        """Placement.place, with the slides made on the GPU; a copy into the place will wait for
        the last readers of what was there (take_waits)."""
        moves = super().place(block, nbytes)
        if moves:
            self._slide(moves)
        offset, size = self.where(block)[0], aligned(nbytes)
        self._released = [r for r in self._released if not r[2].query()]
        self._waits[block] = [e for lo, hi, e in self._released if lo < offset + size and offset < hi]
        return moves

    def read_by(self, blocks: list[Block], event: Event) -> None:
        """Compute launched so far (ending with `event`) read these blocks."""
        for block in blocks:
            self._last_read[block] = event

    def take_waits(self, block: Block) -> list[Event]:
        """What a copy into the block's place must wait for: the last readers of what was there."""
        return self._waits.pop(block, [])

    def _slide(self, moves: list[tuple[int, int, int]]) -> None:
        """The slides run on the copy stream after every copy issued so far (a half-copied block
        moves with the bytes it has) and after all compute launched so far (a block being read
        keeps its bytes until the read ends); compute waits for `moved` before reading any block."""
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

    def _move(self, src: int, dst: int, nbytes: int) -> None:
        """Copy down (dst < src) through the staging buffer: safe where the two ranges overlap."""
        staging = self._staging
        for done in range(0, nbytes, len(staging)):
            n = min(len(staging), nbytes - done)
            staging[:n].copy_(self.buffer[src + done: src + done + n], non_blocking=True)
            self.buffer[dst + done: dst + done + n].copy_(staging[:n], non_blocking=True)

    def free(self, block: Block) -> tuple[int, int]:
        self._waits.pop(block, None)
        last_read = self._last_read.pop(block, None)
        offset, size = super().free(block)
        if last_read is not None:
            self._released.append((offset, offset + size, last_read))
        return offset, size

    def view(self, block: Block) -> torch.Tensor:
        """The block's bytes on the device."""
        offset, nbytes = self.where(block)
        return self.buffer[offset: offset + nbytes]


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
