"""What joins several GPUs of one host, measured for the simulator's multi-GPU profile
(python -m realrun.calibrate --gpus N):
- every GPU's host link on its own, and all of them copying at once (the host side's limit:
  root complex, CPU memory), both as bytes per second of back-to-back expert-sized copies;
- device-to-device copies by size between each pair of GPUs that can reach each other directly
  (peer access: NVLink, or PCIe peer-to-peer), the way the executor moves the hidden state across
  a layer boundary (a copy on the destination's compute stream after the source's work).
On the CPU the "devices" are the host: every pair counts as linked and the numbers mean nothing;
the tests run it for its logic.
"""
from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import dataclass, field

import torch

from realrun.backend import Backend

MIB = 1 << 20
PEER_SIZES = [8 << 10, 64 << 10, 1 * MIB, 8 * MIB, 64 * MIB, 256 * MIB]  # a decode token's hidden state .. experts
HOST_LIMIT_SHARE = 0.9  # all links at once below this share of their sum: the host side limits them


@dataclass
class Fabric:
    single_Bps: list[float]  # each GPU's host link alone
    together_Bps: float  # all host links at once, summed
    peer_curve: list[list[float]] = field(default_factory=list)  # [[bytes, seconds]], GPU 0 -> GPU 1
    pairs: list[list[int]] = field(default_factory=list)  # GPU pairs with direct access

    @property
    def host_aggregate_Bps(self) -> float | None:
        """The simulator's host_aggregate_Bps: None when the links together reach their sum."""
        limited = self.together_Bps < HOST_LIMIT_SHARE * sum(self.single_Bps)
        return self.together_Bps if limited else None

    def notes(self) -> list[str]:
        singles = ", ".join(f"{b / 1e9:.1f}" for b in self.single_Bps)
        notes = [f"host links alone: {singles} GB/s; all {len(self.single_Bps)} at once: "
                 f"{self.together_Bps / 1e9:.1f} GB/s together "
                 + ("(the host side limits them: host_aggregate_Bps)" if self.host_aggregate_Bps is not None
                    else "(no host-side limit)")]
        if self.peer_curve:
            (small, small_s), (big, big_s) = self.peer_curve[0], self.peer_curve[-1]
            notes.append(f"GPU-to-GPU copies (pairs {self.pairs}): {small / 1024:.0f} KiB in {small_s * 1e6:.1f} us, "
                         f"{big / MIB:.0f} MiB at {big / big_s / 1e9:.1f} GB/s")
        else:
            notes.append("no pair of GPUs reaches the other directly: hidden states cross through the host")
        return notes


def _sync_all(backends: list[Backend]) -> None:
    for backend in backends:
        backend.synchronize()


def host_bandwidth(backends: list[Backend], nbytes: int, copies: int) -> float:
    """Bytes per second of `copies` back-to-back host->GPU copies of `nbytes` on each backend's copy
    stream, all backends at once (wall time from the first launch to the last landing)."""
    pairs = [(backend.pinned(nbytes), backend.empty(nbytes)) for backend in backends]
    for (src, dst), backend in zip(pairs, backends):  # first touches cost more
        with backend.on_copy():
            dst.copy_(src, non_blocking=True)
    _sync_all(backends)
    started = time.perf_counter()
    for _ in range(copies):
        for (src, dst), backend in zip(pairs, backends):
            with backend.on_copy():
                dst.copy_(src, non_blocking=True)
    _sync_all(backends)
    return len(backends) * copies * nbytes / (time.perf_counter() - started)


def peer_pairs(backends: list[Backend]) -> list[list[int]]:
    if not backends[0].is_cuda:
        return [list(p) for p in itertools.combinations(range(len(backends)), 2)]
    return [[a, b] for a, b in itertools.combinations(range(len(backends)), 2)
            if torch.cuda.can_device_access_peer(backends[a].device, backends[b].device)
            and torch.cuda.can_device_access_peer(backends[b].device, backends[a].device)]


def peer_copy_time(source: Backend, target: Backend, nbytes: int, reps: int) -> float:
    """Median seconds of one copy from `source` to `target`, as the executor crosses a layer boundary:
    the target's compute stream waits for the source's, copies, and the host waits for it."""
    src, dst = source.empty(nbytes), target.empty(nbytes)
    times = []
    for i in range(reps + 2):  # two warm-up copies (peer mappings are made on first use)
        _sync_all([source, target])
        started = time.perf_counter()
        target.compute_waits_for(source.record_compute())
        with target.on_compute():
            dst.copy_(src, non_blocking=True)
        target.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure_fabric(backends: list[Backend], expert_bytes: int, copies: int = 8, peer_reps: int = 20,
                   peer_sizes: list[int] | None = None) -> Fabric:
    singles = [host_bandwidth([b], expert_bytes, copies) for b in backends]
    together = host_bandwidth(backends, expert_bytes, copies)
    pairs = peer_pairs(backends)
    curve = [[float(n), peer_copy_time(backends[pairs[0][0]], backends[pairs[0][1]], n, peer_reps)]
             for n in (peer_sizes or PEER_SIZES)] if pairs else []
    if backends[0].is_cuda:
        torch.cuda.empty_cache()
    return Fabric(singles, together, curve, pairs)

