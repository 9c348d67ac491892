"""One GPU's expert cache: byte budget, residency, pins and the admission of new copies.

Engine-neutral: the SimPy simulator and realrun's executor both keep their residency here, so the
budget is enforced, and eviction decided, by one piece of code. Memory is reserved when a copy
starts and released by eviction (resident) or cancellation (in flight); the cache can never hold
more than its capacity.
"""
from __future__ import annotations

from typing import Callable, Iterator, NamedTuple

import numpy as np

from policies.base import Block, Policy
from sim.errors import PolicyError

RESIDENT = 1
IN_FLIGHT = 2


def block_code(block: Block) -> int:
    """One integer per block, ordered as the blocks are (layer, then expert, then part; each below 2**21)."""
    layer, expert, part = block
    return (layer << 42) | (expert << 21) | part


class RunningLayer(NamedTuple):
    """The layer being computed, as layer_protocol.start_layer planned it (seen from one GPU)."""

    order: list[int]  # compute order of the entries of `blocks`
    blocks: list[list[Block]]  # per expert; entries from `routed` on are a whole-layer gather's
    homes: list[int]  # GPU of each entry
    gpu: int  # the GPU of this cache
    routed: int

    def pinned_while_waiting(self, block: Block) -> tuple[list[Block], list[Block]]:
        """(before, after): this GPU's blocks of the layer still pinned when its compute waits for
        `block`. After: those it reaches later, in that order. Before: none, as the compute unpins
        what it has run before it waits; but a whole-layer gather waits for every block (its own
        queued after the routed experts') before it runs anything, so there all of them. Both empty
        when `block` is not one of the layer's."""
        mine = [i for i in self.order if self.homes[i] == self.gpu]
        sequence = [b for i in mine for b in self.blocks[i]]
        if block not in sequence:
            return [], []
        k = sequence.index(block)
        gathers = any(i >= self.routed for i in mine)
        return (sequence[:k] if gathers else []), sequence[k + 1:]

    def demand_rank(self, block: Block) -> int:
        """The rank start_layer gave the block's demand copy: routed experts' blocks in compute
        order, then a gather's."""
        ranked = [b for i in self.order if i < self.routed for b in self.blocks[i]] + \
            [b for i in self.order if i >= self.routed for b in self.blocks[i]]
        return ranked.index(block)


class ExpertCache:
    def __init__(self, capacity_bytes: int, block_bytes: Callable[[Block], int]):
        self.capacity_bytes = int(capacity_bytes)
        self._block_bytes = block_bytes
        self._state: dict[Block, int] = {}
        # state(block): RESIDENT, IN_FLIGHT, or None when not cached. The dict's own get, as the
        # layer protocol asks it for every entry of every prefetch plan.
        self.state: Callable[[Block], int | None] = self._state.get
        self._pins: dict[Block, int] = {}
        self.used_bytes = 0  # resident + in flight
        self.resident_bytes = 0
        self.pinned_resident_bytes = 0
        self.unused_prefetched: set[Block] = set()
        self.high_water_bytes = 0
        self.evictions = 0
        self.wasted_prefetch_bytes = 0
        self.running_layer: RunningLayer | None = None
        # The resident blocks as columns of an array (layer, expert, part and block_code rows; one
        # column a block, `_blocks` the same in order), and which are evictable, kept as they change
        # so a policy ranking them with numpy (policies.victims) does not rebuild it on every copy.
        # Made at the first resident_table or resident_mask call, with the grid below, and kept from
        # then on: a cache nobody asks (a policy keeping its own order, plans of lists) skips the
        # bookkeeping on every copy and pin.
        self._tracked = False
        self._rows: dict[Block, int] = {}
        self._blocks: list[Block] = []
        self._table = np.zeros((4, 16), dtype=np.int64)
        self._evictable = np.zeros(16, dtype=np.bool_)
        # Which (layer, expert) have part 0 resident, grown as blocks land: the layer protocol skips
        # a prefetch plan's resident blocks with one lookup (resident_mask).
        self._grid = np.zeros((0, 0), dtype=np.bool_)

    # --- what a policy may see (policies.base.CacheView) ---
    def free_bytes(self) -> int:
        return self.capacity_bytes - self.used_bytes

    def block_bytes(self, block: Block) -> int:
        return self._block_bytes(block)

    def is_resident(self, block: Block) -> bool:
        return self._state.get(block) == RESIDENT

    def is_in_flight(self, block: Block) -> bool:
        return self._state.get(block) == IN_FLIGHT

    def is_evictable(self, block: Block) -> bool:
        return self._state.get(block) == RESIDENT and block not in self._pins

    def resident_blocks(self) -> Iterator[Block]:
        return (b for b, s in self._state.items() if s == RESIDENT)

    def resident_table(self) -> tuple[np.ndarray, np.ndarray]:
        """The resident blocks as the columns of an int64 array, in no set order (rows layer,
        expert, part and block_code), and whether each is evictable: views, valid until the cache
        changes."""
        if not self._tracked:
            self._track()
        n = len(self._blocks)
        return self._table[:, :n], self._evictable[:n]

    def resident_mask(self, layers: np.ndarray, experts: np.ndarray) -> np.ndarray:
        """Whether each block (layers[i], experts[i], 0) is resident (int64 arrays, layers in range)."""
        if not self._tracked:
            self._track()
        grid = self._grid
        inside = (experts >= 0) & (layers < grid.shape[0]) & (experts < grid.shape[1])
        if inside.all():
            return grid[layers, experts]
        mask = np.zeros(len(layers), dtype=np.bool_)
        mask[inside] = grid[layers[inside], experts[inside]]
        return mask

    def _track(self) -> None:
        """Start keeping the table and the grid, from the blocks resident now."""
        self._tracked = True
        for block in self.resident_blocks():
            self._add_row(block)

    def _set_grid(self, block: Block, resident: bool) -> None:
        layer, expert, part = block
        if part:
            return
        grid = self._grid
        if layer >= grid.shape[0] or expert >= grid.shape[1]:
            grown = np.zeros((max(layer + 1, grid.shape[0]), max(expert + 1, grid.shape[1])), dtype=np.bool_)
            grown[: grid.shape[0], : grid.shape[1]] = grid
            self._grid = grid = grown
        grid[layer, expert] = resident

    def _add_row(self, block: Block) -> None:
        if not self._tracked:
            return
        n = len(self._blocks)
        if n == self._table.shape[1]:
            self._table = np.concatenate([self._table, np.zeros_like(self._table)], axis=1)
            self._evictable = np.concatenate([self._evictable, np.zeros_like(self._evictable)])
        self._rows[block] = n
        self._blocks.append(block)
        self._table[:, n] = (*block, block_code(block))
        self._evictable[n] = block not in self._pins
        self._set_grid(block, True)

    def _drop_row(self, block: Block) -> None:
        if not self._tracked:
            return
        self._set_grid(block, False)
        i = self._rows.pop(block)
        moved = self._blocks.pop()
        if moved != block:  # the last column moves into the gap
            last = len(self._blocks)
            self._rows[moved] = i
            self._blocks[i] = moved
            self._table[:, i] = self._table[:, last]
            self._evictable[i] = self._evictable[last]

    # --- engine side ---
    def holds(self, block: Block) -> bool:
        """Resident or in flight."""
        return block in self._state

    def evictable_bytes(self) -> int:
        return self.resident_bytes - self.pinned_resident_bytes

    def pin_count(self, block: Block) -> int:
        return self._pins.get(block, 0)

    def reserve(self, block: Block) -> None:
        nbytes = self._block_bytes(block)
        if block in self._state:
            raise PolicyError(f"block {block} is already cached")
        if self.used_bytes + nbytes > self.capacity_bytes:
            raise PolicyError(f"reserving {block} would exceed the budget")
        self._state[block] = IN_FLIGHT
        self.used_bytes += nbytes
        self.high_water_bytes = max(self.high_water_bytes, self.used_bytes)

    def commit(self, block: Block, prefetched: bool) -> None:
        """An in-flight copy has landed."""
        self._state[block] = RESIDENT
        self._add_row(block)
        nbytes = self._block_bytes(block)
        self.resident_bytes += nbytes
        if block in self._pins:
            self.pinned_resident_bytes += nbytes
        if prefetched:
            self.unused_prefetched.add(block)

    def cancel(self, block: Block, copied_bytes: int) -> None:
        """Abandon an in-flight copy: its memory is released and the bytes already moved wasted."""
        del self._state[block]
        self.used_bytes -= self._block_bytes(block)
        self.wasted_prefetch_bytes += copied_bytes

    def evict(self, block: Block) -> None:
        if not self.is_evictable(block):
            raise PolicyError(f"block {block} is not evictable (not resident, or pinned by the running layer)")
        nbytes = self._block_bytes(block)
        del self._state[block]
        self._drop_row(block)
        self.used_bytes -= nbytes
        self.resident_bytes -= nbytes
        self.evictions += 1
        if block in self.unused_prefetched:
            self.unused_prefetched.discard(block)
            self.wasted_prefetch_bytes += nbytes

    def take_slid_bytes(self) -> int:
        """Bytes compaction slid since last asked: none here, where bytes are only counted
        (sim.placement.PlacedCache places them)."""
        return 0

    def pin(self, block: Block) -> None:
        count = self._pins.get(block, 0)
        self._pins[block] = count + 1
        if count == 0 and self._state.get(block) == RESIDENT:
            self.pinned_resident_bytes += self._block_bytes(block)
            if self._tracked:
                self._evictable[self._rows[block]] = False

    def unpin(self, block: Block) -> None:
        count = self._pins[block]
        if count == 1:
            del self._pins[block]
            if self._state.get(block) == RESIDENT:
                self.pinned_resident_bytes -= self._block_bytes(block)
                if self._tracked:
                    self._evictable[self._rows[block]] = True
        else:
            self._pins[block] = count - 1

    def mark_used(self, block: Block) -> bool:
        """Record a use; True if it was the first use of a prefetched block (a prefetch hit)."""
        if block in self.unused_prefetched:
            self.unused_prefetched.discard(block)
            return True
        return False

    def admit(self, block: Block, policy: Policy, demand: bool) -> bool:
        """Make room for a copy about to start, evicting what the policy chooses.

        False when it cannot start now: not enough evictable memory (everything else pinned or in
        flight), or the policy declined a prefetch.
        """
        need = self._block_bytes(block)
        if self.free_bytes() + self.evictable_bytes() < need:
            return False
        victims = policy.choose_victims(block, need, self)
        if victims is None:
            if demand:
                raise PolicyError(f"policy '{policy.name}' declined demand load {block}; only prefetches may be declined")
            return False
        freed = self.free_bytes() + sum(self._block_bytes(v) for v in set(victims))
        if freed < need:
            raise PolicyError(f"policy '{policy.name}' chose victims freeing {freed:,} bytes; {block} needs {need:,}")
        for victim in victims:
            if not self.is_evictable(victim):
                raise PolicyError(f"policy '{policy.name}' chose {victim} as a victim, but it is not evictable")
            self.evict(victim)
        return True
