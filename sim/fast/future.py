"""The replay's future (sim.future.ReplayFuture's view) built from the trace arrays with numpy.

Same positions (step * num_layers + layer, steps as the engines run them: each request's prefill,
when it has one, then its decode iterations, request after request), without walking the passes.
"""
from __future__ import annotations

import numpy as np


class ArrayFuture:
    def __init__(self, tables, requests: list[int], num_layers: int, num_experts: int):
        L, E = num_layers, num_experts
        self.num_layers = L
        reqs = np.asarray(requests, dtype=np.int64)
        prefilled = tables.has_prefill[reqs].astype(np.int64)
        decode = tables.decode[reqs]
        steps = prefilled + decode
        start = np.concatenate([[0], np.cumsum(steps)[:-1]]).astype(np.int64)
        self.num_steps = int(steps.sum())
        # decode iterations: their rows and steps
        first = tables.offset[reqs] + tables.prefill[reqs]
        owner = np.repeat(np.arange(len(reqs)), decode)
        within = np.arange(int(decode.sum())) - np.repeat(np.cumsum(decode) - decode, decode)
        rows = first[owner] + within
        dsteps = start[owner] + prefilled[owner] + within
        layer = np.arange(L, dtype=np.int64)
        experts = tables.experts[rows]  # [decode iterations, layers, k]
        dblock = (layer[None, :, None] * E + experts).ravel()
        dpos = np.broadcast_to((dsteps[:, None] * L + layer[None, :])[:, :, None], experts.shape).ravel()
        # prefills: every expert a prompt token chose
        p = np.flatnonzero(prefilled)
        which, pl, pe = np.nonzero(tables.counts[reqs[p]])
        pblock = pl * E + pe
        ppos = start[p][which] * L + pl
        block = np.concatenate([dblock, pblock])
        pos = np.concatenate([dpos, ppos])
        order = np.lexsort((pos, block))
        self.block_uses = pos[order].astype(np.int64)  # per block (CSR by uses_ptr), ascending
        self.uses_ptr = np.concatenate([[0], np.cumsum(np.bincount(block, minlength=L * E))]).astype(np.int64)
        self._E = E

    def position(self, step: int, layer: int) -> int:
        return step * self.num_layers + layer

    def uses_of(self, layer: int, expert: int) -> np.ndarray:
        b = layer * self._E + expert
        return self.block_uses[self.uses_ptr[b]:self.uses_ptr[b + 1]]

    def next_use(self, layer: int, expert: int, after: int) -> float:
        uses = self.uses_of(layer, expert)
        i = int(np.searchsorted(uses, after, side="right"))
        return float(uses[i]) if i < len(uses) else float("inf")
