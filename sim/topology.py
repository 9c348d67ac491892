"""Where a model's pieces live on N GPUs, and what moving data between them costs.

Placements:
- "layers" (default): consecutive layers per GPU, as transformers' device_map serves one model on
  several GPUs (and FineMoE does); a layer's attention and experts run on its GPU, and the hidden
  state crosses to the next GPU at the boundaries.
- "experts": expert-parallel; expert e of every layer lives on GPU e mod N; attention runs on GPU 0,
  tokens are dispatched to the GPUs of their experts and combined back every layer.
- "round_robin": as "experts", but expert (l, e) lives on GPU (l * E + e) mod N, the order in
  which the FineMoE artifact deals experts out over all GPUs (core/model/model_topology.cpp,
  InitializeTopology), so every GPU holds an equal share even when N does not divide E.
Transfers between NVLink-paired GPUs use NVLink; others go through the host (two PCIe hops).
"""
from __future__ import annotations

from dataclasses import dataclass

from sim.errors import ConfigError
from sim.profiles import HardwareProfile
from traces import ModelSpec

PLACEMENTS = ("layers", "experts", "round_robin")


@dataclass(frozen=True)
class Topology:
    num_gpus: int
    placement: str
    layer_gpu: tuple[int, ...]  # attention (and, for "layers", experts) of each layer
    peers: tuple[tuple[int, ...], ...]  # NVLink peers of each GPU
    num_experts: int = 0  # per layer: round_robin deals (layer, expert) pairs out in this order

    @classmethod
    def build(cls, hardware: HardwareProfile, model: ModelSpec, num_gpus: int | None, placement: str) -> Topology:
        n = hardware.num_gpus if num_gpus is None else int(num_gpus)
        if n < 1:
            raise ConfigError(f"gpus={n}: need at least one GPU")
        if placement not in PLACEMENTS:
            raise ConfigError(f"placement '{placement}' unknown; use {' or '.join(PLACEMENTS)}")
        if placement == "layers" and n > model.num_layers:
            raise ConfigError(f"{n} GPUs for {model.num_layers} layers: use at most one GPU per layer")
        if placement == "experts" and n > model.num_experts:
            raise ConfigError(f"{n} GPUs for {model.num_experts} experts per layer: use placement=layers")
        layers = model.num_layers
        layer_gpu = tuple(l * n // layers for l in range(layers)) if placement == "layers" else (0,) * layers
        peers: list[list[int]] = [[] for _ in range(n)]
        for a, b in hardware.nvlink_pairs:
            if a < n and b < n:
                peers[a].append(b)
                peers[b].append(a)
        return cls(n, placement, layer_gpu, tuple(tuple(p) for p in peers), model.num_experts)

    def home(self, layer: int, expert: int) -> int:
        """The GPU whose cache serves (layer, expert)."""
        if self.placement == "round_robin":
            return (layer * self.num_experts + expert) % self.num_gpus
        return self.layer_gpu[layer] if self.placement == "layers" else expert % self.num_gpus

    def layers_of(self, gpu: int) -> list[int]:
        if self.placement != "layers":
            return list(range(len(self.layer_gpu)))
        return [l for l, g in enumerate(self.layer_gpu) if g == gpu]

    def transfer_time(self, hardware: HardwareProfile, src: int, dst: int, nbytes: float) -> float:
        if src == dst:
            return 0.0
        if dst in self.peers[src] and hardware.nvlink is not None:
            return hardware.nvlink.copy_time(nbytes)
        return 2 * hardware.host_link.copy_time(nbytes)  # device -> host -> device
