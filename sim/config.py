"""Configuration of one simulated run: a plain dataclass, usable without Hydra."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from sim.errors import ConfigError


@dataclass
class SimConfig:
    trace: str = "default"  # 'default', a shipped trace's name, or a trace directory
    policy: str = "lru"
    policy_params: dict[str, Any] = field(default_factory=dict)
    budget: str = "6GB"  # 6GB, 512MiB, 128experts
    model: str | dict[str, Any] | None = None  # None: the trace's own model; else a profile with its shape
    hardware: str | dict[str, Any] = "h100"
    warm_start: bool = False
    arrival: str = "closed"  # closed (C clients) | poisson | trace
    clients: int = 1  # closed loop: concurrent clients
    rate_rps: float = 1.0  # poisson arrivals per second
    max_batch: int = 1  # continuous batching: most requests in one decode pass
    gpus: int | None = None  # None: as many as the hardware profile has
    placement: str = "layers"  # layers (split in order, like device_map) | experts (expert-parallel)
    budget_scope: str = "per_gpu"  # the budget is each GPU's, or the total split evenly
    host_budget: str | None = None  # host RAM for experts (64GB, 300experts) over the profile's disk; None: all in RAM
    max_requests: int | None = None
    train_fraction: float = 0.0  # leading share of the requests given to policy.fit(), not replayed
    seed: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SimConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        cfg = cls(**data)
        if not 0.0 <= cfg.train_fraction < 1.0:
            raise ConfigError(f"train_fraction {cfg.train_fraction} must be in [0, 1)")
        if cfg.max_requests is not None and cfg.max_requests < 1:
            raise ConfigError(f"max_requests {cfg.max_requests} must be at least 1")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
