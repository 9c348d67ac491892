"""A GPU's inbound copies in SimPy: the transport under the engine-neutral copy scheduler.

sim.copy_scheduler decides which copy goes next and makes room for it; this moves its bytes in
simulated time. A copy comes from host memory over the GPU's PCIe link (latency + bytes /
bandwidth, per chunk) or from the NVLink peer the scheduler chose. Host copies of all GPUs share the
host side's aggregate limit, when the profile sets one: concurrent transfers then split it fairly
(a fluid model, re-planned whenever one starts or ends). With a disk tier a block not in host RAM
is read from the drive first. Completions are SimPy timeouts with callbacks, not processes.
"""
from __future__ import annotations

import itertools
from typing import Callable

import simpy

from policies.base import Block
from sim.compute import ComputeModel
from sim.copy_queue import CopyJob
from sim.copy_scheduler import CopyScheduler
from sim.host_thread import HostThread
from sim.profiles import HardwareProfile


class HostFabric:
    """The host side's aggregate bandwidth, shared max-min fairly by the host copies in flight."""

    def __init__(self, env: simpy.Environment, aggregate_Bps: float):
        self.env = env
        self.aggregate_Bps = aggregate_Bps
        self._active: dict[int, list] = {}  # id -> [remaining bytes, link bandwidth, rate, on_done]
        self._ids = itertools.count()
        self._last = 0.0
        self._version = 0

    def transfer(self, nbytes: float, cap_Bps: float, on_done: Callable[[], None]) -> None:
        self._progress()
        self._active[next(self._ids)] = [float(nbytes), cap_Bps, 0.0, on_done]
        self._plan()

    def _progress(self) -> None:
        elapsed = self.env.now - self._last
        if elapsed > 0:
            for transfer in self._active.values():
                transfer[0] -= transfer[2] * elapsed
        self._last = self.env.now

    def _plan(self) -> None:
        """Water-filling: each transfer gets min(its link's bandwidth, an equal share of what is left)."""
        left, waiting = self.aggregate_Bps, sorted(self._active.values(), key=lambda t: t[1])
        for i, transfer in enumerate(waiting):
            transfer[2] = min(transfer[1], left / (len(waiting) - i))
            left -= transfer[2]
        if not self._active:
            return
        self._version += 1
        version = self._version
        finish = min(max(t[0], 0.0) / t[2] for t in self._active.values())
        self.env.timeout(finish).callbacks.append(lambda _e: self._finish(version))

    def _finish(self, version: int) -> None:
        if version != self._version:
            return  # re-planned since
        self._progress()
        done = [key for key, t in self._active.items() if t[0] <= 1.0]  # within a byte: float noise
        callbacks = [self._active.pop(key)[3] for key in done]
        self._plan()
        for on_done in callbacks:
            on_done()


class HostLink:
    """The Transport of one GPU's CopyScheduler in simulated time; ready(block) is the event a layer waits on."""

    def __init__(self, env: simpy.Environment, scheduler: CopyScheduler, hardware: HardwareProfile,
                 fabric: HostFabric | None = None, compute: ComputeModel | None = None, tier=None,
                 land: Callable[[CopyScheduler], None] = CopyScheduler.chunk_landed, host: HostThread | None = None):
        """land(scheduler): the landing's handling (sim.layer_protocol.HostCalls.chunk_landed); host:
        the host thread that handles it, in its turn and for its charged time (None: at once)."""
        self.env = env
        self.scheduler = scheduler
        self.land = land
        self.host = host
        self.gpu = scheduler.gpu
        self.spec = hardware.host_link
        self.nvlink = hardware.nvlink
        self.fabric = fabric
        self.compute = compute  # the GPUs' compute, which slides in the cache wait for and hold up
        self.mem_bandwidth_Bps = hardware.mem_bandwidth_Bps
        self.tier = tier  # sim.disk.HostTier: host RAM over the drive; None: every expert in RAM
        self._waiters: dict[Block, simpy.Event] = {}
        scheduler.transport = self

    @staticmethod
    def peer_faster(hardware: HardwareProfile) -> Callable[[int], bool] | None:
        """Whether a copy of n bytes is faster from an NVLink peer than from the host (None: no NVLink)."""
        nvlink, host = hardware.nvlink, hardware.host_link
        return None if nvlink is None else lambda nbytes: nvlink.copy_time(nbytes) < host.copy_time(nbytes)

    def ready(self, block: Block) -> simpy.Event:
        """An event that fires when the block has landed."""
        event = self._waiters.get(block)
        if event is None:
            event = self._waiters[block] = self.env.event()
        return event

    def landed(self, block: Block) -> None:
        waiter = self._waiters.pop(block, None)
        if waiter is not None:
            waiter.succeed()

    def after_slides(self, job: CopyJob, nbytes: int) -> None:
        """On the copy stream after the compute in flight, the slides copy blocks down through a
        staging buffer (each byte read and written twice, at device-memory speed); expert compute
        waits for them, the copy starts after them."""
        now = self.env.now
        start = max(now, self.compute.busy_until(self.gpu)) if self.compute is not None else now
        done = start + 4 * nbytes / self.mem_bandwidth_Bps
        if self.compute is not None:
            self.compute.hold(self.gpu, done)
        self.env.timeout(done - now).callbacks.append(lambda _e: self.start(job))

    def start(self, job: CopyJob) -> None:
        if self.tier is not None and job.source is None and job.chunks_left == job.chunks:
            wait = self.tier.read(job.block[0], job.block[1], self.env.now)  # RAM, or the drive first
            if wait:
                self.env.timeout(wait).callbacks.append(lambda _e: self._copy(job))
                return
        self._copy(job)

    def _copy(self, job: CopyJob) -> None:
        if job.source is not None:
            self.env.timeout(self.nvlink.copy_time(job.chunk_bytes)).callbacks.append(self._landed_chunk)
        elif self.fabric is None:
            self.env.timeout(self.spec.copy_time(job.chunk_bytes)).callbacks.append(self._landed_chunk)
        else:
            self.env.timeout(self.spec.latency_s).callbacks.append(
                lambda _e: self.fabric.transfer(job.chunk_bytes, self.spec.bandwidth_Bps, self._landed_chunk))

    def _landed_chunk(self, _event: simpy.Event | None = None) -> None:
        if self.host is None:
            self.land(self.scheduler)
        else:  # handled by the host thread in its turn: the link idles until then
            self.env.timeout(self.host.take(self.host.land_s)).callbacks.append(lambda _e: self.land(self.scheduler))
