"""Expert memory: the GPU cache's preallocated slots and the experts' pinned host copies.

SlotPool is one device buffer of the cache's budget (plus at most ALIGN bytes of padding per
block), allocated once: blocks are placed first-fit and never grow it. Blocks of one size (whole
experts, or equal parts) always fit while the cache's byte count says they do; unequal parts
could fragment it, which raises an error naming the problem rather than exceeding the budget.

HostExperts holds every expert's weights in pinned host memory, or, when host memory is short,
`sources` pinned buffers that experts of the same layer shape share round-robin: a copy's speed
does not depend on which host buffer it reads, and the values are random anyway.
"""
from __future__ import annotations

import bisect

import torch

from policies.base import Block
from realrun.backend import Backend
from traces import ModelSpec

ALIGN = 256  # bytes: slot starts aligned for wide loads


def _aligned(nbytes: int) -> int:
    return -(-int(nbytes) // ALIGN) * ALIGN


class FragmentedError(RuntimeError):
    pass


class SlotPool:
    def __init__(self, backend: Backend, capacity_bytes: int, smallest_block_bytes: int):
        self.backend = backend
        self.capacity_bytes = int(capacity_bytes)
        max_blocks = self.capacity_bytes // max(1, int(smallest_block_bytes))
        self.arena_bytes = self.capacity_bytes + ALIGN * (max_blocks + 1)
        self.buffer = backend.empty(self.arena_bytes)
        self._free: list[tuple[int, int]] = [(0, self.arena_bytes)]  # (offset, size), sorted, coalesced
        self._where: dict[Block, tuple[int, int]] = {}  # block -> (offset, nbytes)

    def __contains__(self, block: Block) -> bool:
        return block in self._where

    def alloc(self, block: Block, nbytes: int) -> None:
        size = _aligned(nbytes)
        for i, (offset, free) in enumerate(self._free):
            if free >= size:
                if free == size:
                    del self._free[i]
                else:
                    self._free[i] = (offset + size, free - size)
                self._where[block] = (offset, int(nbytes))
                return
        raise FragmentedError(f"the expert cache's memory is fragmented: no contiguous {size:,} bytes for {block} "
                              "(blocks of unequal sizes); give the policy equal parts")

    def free(self, block: Block) -> None:
        offset, nbytes = self._where.pop(block)
        size = _aligned(nbytes)
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
