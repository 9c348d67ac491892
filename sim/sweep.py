"""Sweeps that resume: a stable directory per sweep command, and skipping runs already complete.

Hydra names a sweep's directory after the clock; here it is named after the sweep's own overrides
(multirun/budget=2GB,6GB_policy=lru,belady) and each run's directory after its overrides
(conf/cli/config.yaml: hydra.sweep.subdir), so the same command run again finds the runs it finished and
skips them: an interrupted sweep, restarted, runs only what is missing.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

from hydra.types import RunMode
from omegaconf import DictConfig

from sim.api import with_training_split
from sim.cli import CLI_ONLY
from sim.config import SimConfig
from sim.errors import ConfigError
from sim.metrics import RunMetrics
from sim.provenance import PROVENANCE_FILE, provenance, same_provenance
from sim.report import CONFIG_FILE, METRICS_FILE, config_json

SWEEP_ROOT = "multirun"
MULTIRUN_FLAGS = ("-m", "--multirun")
_UNSAFE = re.compile(r"[^\w=,.+-]")
_MAX_NAME = 100


def task_overrides(argv: list[str]) -> list[str]:
    """The overrides of the simulated runs: not Hydra's own, not the CLI-only keys, not flags."""
    overrides = []
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key = arg.lstrip("+~").partition("=")[0]
        if key.startswith(("hydra.", "hydra/")) or key in CLI_ONLY:
            continue
        overrides.append(arg.lstrip("+~"))
    return sorted(overrides)


def sweep_dir_name(argv: list[str]) -> str:
    """A directory name that is the same for the same sweep, whatever the order of its overrides."""
    overrides = task_overrides(argv)
    name = "_".join(overrides) or "defaults"
    safe = _UNSAFE.sub("_", name)
    if safe != name or len(safe) > _MAX_NAME:
        # A digest keeps two sweeps that differ only in replaced or cut characters apart.
        safe = f"{safe[:_MAX_NAME]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return safe


def with_stable_sweep_dir(argv: list[str]) -> list[str]:
    """argv plus hydra.sweep.dir=multirun/NAME for a sweep (-m) that does not choose its own directory."""
    if not any(arg in MULTIRUN_FLAGS for arg in argv) or any(arg.startswith("hydra.sweep.dir=") for arg in argv):
        return argv
    return [*argv, f"hydra.sweep.dir='{SWEEP_ROOT}/{sweep_dir_name(argv)}'"]  # quoted: names hold = and ,


def completed_metrics(out_dir: str | Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The metrics of a complete run of exactly this config in out_dir, else None.

    metrics.json is written last, so its presence marks a complete run; the stored config must
    equal this one, or a changed default (a trace, a profile) would pass off old results as new;
    and so must the trace's content and the code's version (sim.provenance): a trace rewritten in
    place, or an update that changes results, runs it again.
    """
    out = Path(out_dir)
    config = with_training_split(SimConfig.from_dict(config)).to_dict()  # as run_config.json records it
    metrics, stored, made_by = out / METRICS_FILE, out / CONFIG_FILE, out / PROVENANCE_FILE
    if not (metrics.is_file() and stored.is_file() and made_by.is_file()):
        return None
    try:
        if json.loads(stored.read_text()) != json.loads(config_json(config)):
            return None
        if not same_provenance(json.loads(made_by.read_text()), provenance(config["trace"])):
            return None
        return json.loads(metrics.read_text())
    except json.JSONDecodeError:
        return None  # damaged files: the run is done again


def objective_names() -> list[str]:
    """Metrics a run can return to a sweeper such as Optuna: the numeric ones of metrics.json."""
    numeric = {"int", "float", "float | None"}
    return sorted([f.name for f in fields(RunMetrics) if f.type in numeric] + ["wall_s"])


def check_objective(name: str) -> str:
    if name not in objective_names():
        raise ConfigError(f"objective '{name}' is not a numeric metric; use one of {', '.join(objective_names())}")
    return name


def objective_value(metrics: dict[str, Any], name: str) -> float:
    value = metrics.get(check_objective(name))
    return math.nan if value is None else float(value)


def runs_side_by_side(hydra_cfg: DictConfig) -> bool:
    """A sweep whose launcher runs several runs at once on one terminal (hydra/launcher=local), where
    per-run progress bars would interleave; the launcher reports runs done and time left instead."""
    return hydra_cfg.mode == RunMode.MULTIRUN and hydra_cfg.launcher.get("n_jobs", 1) != 1
