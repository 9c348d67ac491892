"""A sweep's console: one progress bar (runs done of all, time left), then one table of every run.

A Hydra callback (conf/cli/config.yaml: hydra.callbacks), so it works with every launcher: runs
may execute in other processes (joblib) or on other machines (Slurm), and metrics.json, written
last by each run, is what marks one done; the bar counts them in the sweep's directory.
"""
from __future__ import annotations

import itertools
import json
import threading
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from sim.budget import format_bytes
from sim.report import METRICS_FILE

POLL_S = 0.5


def planned_runs(config: DictConfig) -> int | None:
    """How many runs the sweep launches: the product of its swept values (basic sweeper), the
    sweeper's n_trials (Optuna), or None where neither says."""
    trials = config.hydra.sweeper.get("n_trials")
    if trials is not None:
        return int(trials)
    overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    sizes = [len(list(o.sweep_string_iterator())) for o in overrides if o.is_sweep_override()]
    return int(sum(1 for _ in itertools.product(*(range(n) for n in sizes))))


def completed(sweep_dir: Path) -> list[Path]:
    return sorted(sweep_dir.rglob(METRICS_FILE))


def summary_table(metrics_files: list[Path], sweep_dir: Path) -> Table:
    """One row per run: policy, budget, the key metrics with their units, and the run's directory."""
    table = Table(title=f"{len(metrics_files)} runs in {sweep_dir}")
    for column in ("policy", "budget", "hit rate", "TTFT mean (ms)", "TPOT mean (ms)", "TPOT p99 (ms)",
                   "host->GPU (GB)", "run"):
        table.add_column(column, justify="left" if column in ("policy", "budget", "run") else "right")
    for path in metrics_files:
        m: dict[str, Any] = json.loads(path.read_text())
        table.add_row(m["policy"], format_bytes(m["budget_bytes"]), f"{m['hit_rate']:.2%}", _ms(m["ttft_mean_s"]),
                      _ms(m["tpot_mean_s"]), _ms(m["tpot_p99_s"]), f"{m['bytes_h2d'] / 1e9:.2f}",
                      path.parent.relative_to(sweep_dir).as_posix())
    return table


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


class SweepSummary(Callback):
    def __init__(self) -> None:
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._bar: tqdm | None = None

    # Hydra hands its callbacks to the launcher's worker processes, which need none of this state.
    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        self._bar = tqdm(total=planned_runs(config), desc="sweep", unit="run", disable=not config.get("progress", True))

        def watch() -> None:
            while not self._stop.wait(POLL_S):
                self._update(sweep_dir)

        self._watcher = threading.Thread(target=watch, daemon=True)
        self._watcher.start()

    def _update(self, sweep_dir: Path) -> None:
        if self._bar is not None:
            done = len(completed(sweep_dir))
            self._bar.update(max(0, min(done, self._bar.total or done) - self._bar.n))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join()
        self._update(sweep_dir)
        if self._bar is not None:
            self._bar.close()
        runs = completed(sweep_dir)
        console = Console(width=200)
        if runs:
            console.print(summary_table(runs, sweep_dir))
        console.print(f"tables and figures: python -m sim.results {sweep_dir}")
