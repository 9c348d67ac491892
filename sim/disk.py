"""A disk tier under host memory: experts on an NVMe drive, a host-RAM budget held as a page cache,
so a copy to the GPU comes from RAM, or first from the drive when RAM does not hold the expert.

The drive (conf/hardware/NAME.yaml, section `disk:`) serves one expert read at a time: latency plus
bytes over its bandwidth, reduced when the reads in flight (queue_depth, how the engine reads an
expert: that many requests at once) are fewer than the drive needs to reach full bandwidth
(saturating_queue_depth). The page cache is LRU over whole experts (as the kernel's page cache
over an mmapped checkpoint): loading the model reads every expert once in (layer, expert) order,
so it starts holding the last ones that fit. The GPU's copy waits for the read (no pipelining of
drive and PCIe within one expert: a conservative model). CPU expert compute reads from RAM too.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from sim.errors import ConfigError
from sim.profiles import _number


@dataclass(frozen=True)
class DiskSpec:
    bandwidth_Bps: float
    latency_s: float
    queue_depth: int = 32
    saturating_queue_depth: int = 32

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> DiskSpec:
        try:
            spec = cls(_number(data["bandwidth_Bps"], f"{where}.bandwidth_Bps"),
                       _number(data["latency_s"], f"{where}.latency_s"),
                       int(data.get("queue_depth", 32)), int(data.get("saturating_queue_depth", 32)))
        except KeyError as exc:
            raise ConfigError(f"{where}: missing {exc}; expected bandwidth_Bps, latency_s[, queue_depth, "
                              "saturating_queue_depth]") from None
        if spec.bandwidth_Bps <= 0 or spec.latency_s < 0 or spec.queue_depth < 1 or spec.saturating_queue_depth < 1:
            raise ConfigError(f"{where}: bandwidth must be positive, latency >= 0, queue depths >= 1")
        return spec

    def to_dict(self) -> dict[str, Any]:
        return {"bandwidth_Bps": self.bandwidth_Bps, "latency_s": self.latency_s, "queue_depth": self.queue_depth,
                "saturating_queue_depth": self.saturating_queue_depth}

    def read_time(self, nbytes: float) -> float:
        share = min(1.0, self.queue_depth / self.saturating_queue_depth)
        return self.latency_s + nbytes / (self.bandwidth_Bps * share)


class HostTier:
    """Host RAM over the drive: which experts RAM holds, the drive's queue, what each tier served."""

    def __init__(self, spec: DiskSpec, ram_bytes: int, expert_bytes: int, num_layers: int, num_experts: int):
        if ram_bytes < expert_bytes:
            raise ConfigError(f"host_budget {ram_bytes:,} bytes holds no expert ({expert_bytes:,} bytes); raise it")
        self.spec = spec
        self.capacity = ram_bytes
        self.expert_bytes = expert_bytes
        self.ram: OrderedDict[tuple[int, int], float] = OrderedDict()  # -> when it is in RAM; least recent first
        self.free_at = 0.0  # when the drive finishes the reads queued so far
        self.ram_hits = 0
        self.disk_reads = 0
        self.disk_bytes = 0.0
        self.disk_wait_s = 0.0
        for key in ((l, e) for l in range(num_layers) for e in range(num_experts)):
            self._admit(key, 0.0)  # loading the model: the page cache keeps the last experts read

    def _admit(self, key: tuple[int, int], ready_at: float) -> None:
        self.ram[key] = ready_at
        while len(self.ram) * self.expert_bytes > self.capacity:
            self.ram.popitem(last=False)

    def read(self, layer: int, expert: int, now: float) -> float:
        """Seconds from `now` until the expert is in RAM (0 when it is), reading it from the drive."""
        key = (layer, expert)
        ready_at = self.ram.get(key)
        if ready_at is not None:  # in RAM, or being read for an earlier request
            self.ram.move_to_end(key)
            self.ram_hits += 1
            return max(0.0, ready_at - now)
        self.free_at = max(now, self.free_at) + self.spec.read_time(self.expert_bytes)
        self.disk_reads += 1
        self.disk_bytes += self.expert_bytes
        self._admit(key, self.free_at)
        wait = self.free_at - now
        self.disk_wait_s += wait
        return wait

    def summary(self) -> dict[str, float]:
        return {"ram_hits": self.ram_hits, "disk_reads": self.disk_reads, "bytes_disk": self.disk_bytes,
                "disk_wait_s": self.disk_wait_s, "host_budget_bytes": self.capacity}
