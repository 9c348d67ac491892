"""From the command line to a SimConfig (Hydra stays out of the simulator's core).

The settings Hydra composes come from SimConfig's own fields and defaults (registered here as the
config node `sim_settings`, which conf/cli/config.yaml includes), so every default has one place.
Bad settings are refused before Hydra's own, page-long errors: check_arguments() names an unknown
key, SimConfig a value of the wrong type, both in one line.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import fields
from functools import lru_cache
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from policies import available
from sim.config import SimConfig, defaults
from sim.errors import ConfigError

CLI_ONLY = {"progress", "skip_complete", "objective"}  # how a run is driven, not what it simulates
# Appended with '+' (conf/cli/policy/NAME.yaml, +budget=SIZE), or filled from SimConfig's defaults when absent.
APPENDED = ("policy", "policy_params", "budget")
GROUPS = ("policy", "tune")  # config groups: policy=NAME chooses conf/cli/policy/NAME.yaml
SETTINGS_NODE = "sim_settings"


@lru_cache(maxsize=None)
def run_id() -> str:
    """This process's tag in its run directory's name: concurrent runs never share a directory."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:4]}"


def register() -> None:
    settings = {k: v for k, v in defaults().items() if k not in APPENDED}
    ConfigStore.instance().store(name=SETTINGS_NODE, node=OmegaConf.create(settings))
    OmegaConf.register_new_resolver("run_id", run_id, replace=True)


register()


def check_arguments(argv: list[str], extra: tuple[str, ...] = ()) -> None:
    """Refuse an unknown setting (key=value) or policy name in one line, before Hydra composes anything.

    extra: top-level keys of another command's config (realrun's `realrun`)."""
    known = {f.name for f in fields(SimConfig)} | CLI_ONLY | set(extra)
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, _, value = arg.lstrip("+~").partition("=")
        head = key.split(".")[0].split("/")[0]
        if key == "policy" and value:
            unknown = [n for n in value.strip("[]").split(",") if n not in available()]
            if unknown:
                raise ConfigError(f"unknown policy '{unknown[0]}'; known policies: {', '.join(available())}")
        if head == "hydra" or head in known or head in GROUPS:
            continue
        raise ConfigError(f"unknown setting {arg.lstrip('+~')}; known settings: "
                          f"{', '.join(sorted(known | set(GROUPS)))}")


def config_from_hydra(cfg: DictConfig) -> SimConfig:
    data: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    base = SimConfig()
    policy = data.pop("policy", None) or {"name": base.policy}
    if isinstance(policy, str):
        policy = {"name": policy}
    data["policy"] = policy.pop("name")
    data["policy_params"] = policy
    budget = data.get("budget")
    data["budget"] = base.budget if budget is None else str(budget)
    for key in CLI_ONLY:
        data.pop(key, None)
    return SimConfig.from_dict(data)
