"""Configuration of one simulated run: a plain dataclass, usable without Hydra.

Each setting's default is here and only here: `python -m sim` composes its settings from these
fields (sim.cli registers them with Hydra), and every value, from Python or the command line, is
checked against the field's type on construction.
"""
from __future__ import annotations

import os
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from sim.errors import ConfigError
from traces.errors import UserError
from traces.typecheck import check_value

# The hardware of a run that names none: the measured profile whose simulated TPOT and hit rates
# met both realrun targets on every policy and budget (25 of 25 on two H200 machines, README
# "Checked against real GPUs").
DEFAULT_HARDWARE = "h200-measured"
# The training split of a policy that learns offline when train_fraction is not set: the trace's
# first quarter trains it, the other three quarters are measured.
DEFAULT_TRAIN_FRACTION = 0.25


@dataclass
class SimConfig:
    trace: str = "default"  # 'default', a shipped trace's name, or a trace directory
    policy: str = "lru"
    policy_params: dict[str, Any] = field(default_factory=dict)
    budget: str = "6GB"  # 6GB, 512MiB, 128experts
    # None: the trace's own model; else a profile name, a transformers config.json, or a profile's fields
    model: str | dict[str, Any] | None = None
    hardware: str | dict[str, Any] = DEFAULT_HARDWARE  # a profile name (conf/hardware), a YAML path, or its fields
    # Host time charged to the policy's decisions: None, what the hardware profile measured for it (an
    # error where a measured profile lacks it); "zero"; or a measured policy's name, whose time it takes.
    policy_host: str | None = None
    warm_start: bool = False
    arrival: Literal["closed", "poisson", "trace"] = "closed"  # closed (C clients) | poisson | trace
    clients: int = 1  # closed loop: concurrent clients
    rate_rps: float = 1.0  # poisson arrivals per second
    max_batch: int = 1  # continuous batching: most requests in one decode pass
    gpus: int | None = None  # None: as many as the hardware profile has
    placement: Literal["layers", "experts", "round_robin"] = "layers"  # layers (split in order, like
    # device_map) | experts (expert-parallel) | round_robin (experts dealt over all GPUs, FineMoE's artifact)
    budget_scope: Literal["per_gpu", "total"] = "per_gpu"  # the budget is each GPU's, or the total split evenly
    host_budget: str | None = None  # host RAM for experts (64GB, 300experts) over the profile's disk; None: all in RAM
    # How the experts are stored (traces.expert_formats), over the model's own (gpt-oss: mxfp4, the
    # others bf16); the command line also takes it as model.expert_format=NAME.
    expert_format: Literal["bf16", "fp8", "int4", "mxfp4"] | None = None
    max_requests: int | None = None
    # Leading share of the requests given to policy.fit(), not replayed; None: DEFAULT_TRAIN_FRACTION
    # for a policy that learns offline (needs_training), 0 for the others (sim.api.with_training_split).
    train_fraction: float | None = None
    seed: int = 0
    engine: str = "auto"  # auto: the fast engine where the policy declares one (sim.fast), else SimPy; simpy | fast

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, os.PathLike):  # a trace, model or hardware given as a Path
                value = os.fspath(value)
            try:
                setattr(self, f.name, check_value(f.name, value, hints[f.name]))
            except UserError as exc:
                raise ConfigError(str(exc)) from None
        if self.train_fraction is not None and not 0.0 <= self.train_fraction < 1.0:
            raise ConfigError(f"train_fraction={self.train_fraction}: expected a number in [0, 1)")
        for name in ("max_requests", "clients", "max_batch", "gpus"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}={value}: expected an integer of at least 1")
        if self.rate_rps <= 0:
            raise ConfigError(f"rate_rps={self.rate_rps}: expected a positive number of requests per second")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SimConfig:
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"unknown setting {unknown[0]}={data[unknown[0]]}; known settings: {', '.join(known)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def defaults() -> dict[str, Any]:
    """Every setting's default, as plain values (what the command line starts from)."""
    return SimConfig().to_dict()
