"""From a composed Hydra config to a SimConfig (Hydra stays out of the simulator's core)."""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from sim.config import SimConfig

DEFAULT_POLICY = "lru"
DEFAULT_BUDGET = "6GB"
CLI_ONLY = {"progress", "skip_complete", "objective"}  # how a run is driven, not what it simulates


def config_from_hydra(cfg: DictConfig) -> SimConfig:
    data: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    policy = data.pop("policy", None) or {"name": DEFAULT_POLICY}
    if isinstance(policy, str):
        policy = {"name": policy}
    data["policy"] = policy.pop("name")
    data["policy_params"] = policy
    data["budget"] = str(data.get("budget") if data.get("budget") is not None else DEFAULT_BUDGET)
    for key in CLI_ONLY:
        data.pop(key, None)
    return SimConfig.from_dict(data)
