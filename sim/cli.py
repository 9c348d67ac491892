"""From the command line to a SimConfig (Hydra stays out of the simulator's core).

The settings Hydra composes come from SimConfig's own fields and defaults (registered here as the
config node `sim_settings`, which conf/cli/config.yaml includes), so every default has one place.
Bad settings are refused before Hydra's own, page-long errors: check_arguments() names an unknown
key, policy or knob, or an override Hydra cannot parse; SimConfig a value of the wrong type; all in
one line.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import fields
from functools import lru_cache
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from omegaconf import DictConfig, OmegaConf

from policies import available, policy_class
from policies.registry import knob_names
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
    """Refuse, in one line and before Hydra composes anything (its errors are pages, status 1): an
    override Hydra cannot parse, an unknown setting, an unknown policy, a knob the policy lacks.

    extra: top-level keys of another command's config (realrun's `realrun`), with their sub-keys."""
    settings = {f.name for f in fields(SimConfig)} | CLI_ONLY
    known = sorted(settings | set(GROUPS) | set(extra))
    overrides = [arg for arg in argv if not arg.startswith("-") and "=" in arg]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as exc:
        raise ConfigError(f"cannot parse the override(s) {' '.join(overrides)}: {str(exc).splitlines()[0]}; "
                          "quote values holding brackets, commas or spaces") from None

    sweeping = any(arg in ("-m", "--multirun") for arg in argv)
    for arg, override in zip(overrides, parsed):
        if override.is_sweep_override() and not sweeping:
            raise ConfigError(f"{arg} lists several values: add -m to sweep over them (python -m sim -m {arg} ...)")

    def values(override) -> list[str]:
        return list(override.sweep_string_iterator()) if override.is_sweep_override() else [str(override.value())]

    for override in parsed:
        if override.key_or_group == "policy":
            unknown = [n for n in values(override) if n not in available()]
            if unknown:
                raise ConfigError(f"unknown policy '{unknown[0]}'; known policies: {', '.join(available())}")
    # The policies whose knobs may be set: those chosen, and those a tuning config (+tune=NAME) chooses.
    named = [n for o in parsed if o.key_or_group in GROUPS for n in values(o) if n in available()]
    for arg, override in zip(overrides, parsed):
        key = override.key_or_group
        head, _, knob = key.partition(".")
        if key in GROUPS:
            continue
        if head == "policy" and knob:
            if not named:
                raise ConfigError(f"{arg}: a policy knob needs its policy first, e.g. +policy={SimConfig().policy} {arg}")
            for name in named:
                knobs = knob_names(policy_class(name))
                if knob.split(".")[0] not in knobs:
                    raise ConfigError(f"policy '{name}' has no knob {knob}; its knobs: {', '.join(knobs) or 'none'}")
        elif not (key in settings or head in ("hydra", *extra) or key.startswith("hydra/") or key in GROUPS):
            raise ConfigError(f"unknown setting {arg.lstrip('+~')}; known settings: {', '.join(known)}")


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
