"""python -m sim +policy=lru +budget=6GB [trace=PATH] [hardware=h100] [model=NAME] [key=value ...]

Sweeps: python -m sim -m +policy=lru,belady +budget=2GB,6GB, in parallel on this machine's cores
(hydra/launcher=local, the default) or on Slurm (hydra/launcher=slurm), into multirun/NAME named
after the sweep's overrides. Each run writes metrics.json, requests.csv, layers.csv and
run_config.json into its Hydra output directory; a run whose directory already holds its complete
results is skipped (skip_complete=false runs it again), so a restarted sweep runs only what is
missing. A run returns its `objective` metric to the sweeper (Optuna: +tune=NAME).
"""
from __future__ import annotations

import shutil
import re
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from tqdm import tqdm

from sim.api import execute, prepare, with_training_split
from sim.cli import check_arguments, config_from_hydra
from sim.report import print_run, write_run
from sim.rundir import claimed, discard_failed_run
from sim.sweep import check_objective, completed_metrics, objective_value, runs_side_by_side, with_stable_sweep_dir
from traces.cli import run_cli
from traces.errors import UserError


SLURM_LAUNCHERS = {"slurm", "submitit_slurm"}


def check_slurm(argv: list[str]) -> None:
    """hydra/launcher=slurm where Slurm is absent: one line, not submitit's traceback at launch."""
    asks = any(arg.lstrip("+~").partition("=")[::2] in {("hydra/launcher", n) for n in SLURM_LAUNCHERS} for arg in argv)
    if asks and (shutil.which("sbatch") is None or shutil.which("srun") is None):
        raise UserError("hydra/launcher=slurm: no Slurm on this machine (sbatch/srun not on PATH); run the sweep "
                        "from a Slurm login node, or here without hydra/launcher=slurm (every core of this machine)")


def run(cfg: DictConfig) -> float:
    out_dir = HydraConfig.get().runtime.output_dir
    with claimed(out_dir):  # refused while another process writes the same directory
        try:
            return run_in(cfg, out_dir)
        except UserError:
            discard_failed_run(out_dir)  # bad input leaves no run directory behind
            raise


def run_in(cfg: DictConfig, out_dir: str) -> float:
    sim_cfg = with_training_split(config_from_hydra(cfg))  # run_config.json records the split used
    objective = check_objective(cfg.objective)
    hydra_cfg = HydraConfig.get()
    done = completed_metrics(out_dir, sim_cfg.to_dict()) if cfg.skip_complete else None
    if done is not None:  # one line, in a sweep too: which runs were not run again
        print(f"skipped, already complete: {out_dir}")
        return objective_value(done, objective)
    prepared = prepare(sim_cfg)
    with tqdm(total=len(prepared.replay), desc=f"{prepared.cfg.policy} {prepared.cfg.budget}", unit="req",
              disable=not cfg.progress or runs_side_by_side(hydra_cfg), leave=False) as bar:
        result = execute(prepared, on_request_done=lambda _r: bar.update())
    write_run(result, out_dir)
    if hydra_cfg.mode != RunMode.MULTIRUN:  # a sweep prints one table of all its runs (sim.sweep_summary)
        print_run(result)
        print(f"results: {out_dir}")
    return objective_value({**result.metrics.to_dict(), "wall_s": result.wall_s}, objective)


@hydra.main(version_base=None, config_path="pkg://conf.cli", config_name="config")
def main(cfg: DictConfig) -> float:
    return run_cli(lambda: run(cfg))


def model_format_alias(argv: list[str]) -> list[str]:
    """model.expert_format=NAME is the setting expert_format (model itself is a name, a path or null)."""
    return [re.sub(r"^([+~]?)model\.expert_format=", r"\1expert_format=", arg) for arg in argv]


if __name__ == "__main__":
    sys.argv = [sys.argv[0], *model_format_alias(sys.argv[1:])]
    run_cli(lambda: (check_arguments(sys.argv[1:]), check_slurm(sys.argv[1:])))
    sys.argv = [sys.argv[0], *with_stable_sweep_dir(sys.argv[1:])]
    main()
