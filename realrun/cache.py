"""The simulator's ExpertCache, with each reserved block given real memory in a SlotPool.

Residency, pins, the budget and eviction stay the simulator's own code (sim.cache); this only
places a block's bytes when its copy starts and frees them when it is evicted or cancelled.
"""
from __future__ import annotations

from typing import Callable

from policies.base import Block
from realrun.memory import SlotPool
from sim.cache import ExpertCache


class SlottedCache(ExpertCache):
    def __init__(self, capacity_bytes: int, block_bytes: Callable[[Block], int], pool: SlotPool):
        super().__init__(capacity_bytes, block_bytes)
        self.pool = pool

    def reserve(self, block: Block) -> None:
        super().reserve(block)
        self.pool.alloc(block, self.block_bytes(block))

    def evict(self, block: Block) -> None:
        super().evict(block)
        self.pool.free(block)

    def cancel(self, block: Block, copied_bytes: int) -> None:
        super().cancel(block, copied_bytes)
        self.pool.free(block)
