"""python -m sim +policy=lru +budget=6GB [trace=PATH] [hardware=h100] [model=NAME] [key=value ...]

Sweeps: python -m sim -m +policy=lru,belady +budget=2GB,6GB. Each run writes metrics.json,
requests.csv, layers.csv and run_config.json into its Hydra output directory.
"""
from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from tqdm import tqdm

from policies import available
from sim.api import execute, prepare
from sim.cli import config_from_hydra
from sim.report import print_run, write_run
from traces.cli import run_cli
from traces.errors import UserError


def check_policy_names(argv: list[str]) -> None:
    """Fail early, in one line, on an unknown policy name (Hydra's own message is a page long)."""
    for arg in argv:
        key, _, value = arg.lstrip("+~").partition("=")
        if key != "policy" or not value:
            continue
        names = value.strip("[]").split(",")
        unknown = [n for n in names if n not in available()]
        if unknown:
            raise UserError(f"unknown policy '{unknown[0]}'; known policies: {', '.join(available())}")


def run(cfg: DictConfig) -> None:
    prepared = prepare(config_from_hydra(cfg))
    out_dir = HydraConfig.get().runtime.output_dir
    with tqdm(total=len(prepared.replay), desc=f"{prepared.cfg.policy} {prepared.cfg.budget}", unit="req",
              disable=not cfg.get("progress", True), leave=False) as bar:
        result = execute(prepared, on_request_done=lambda _r: bar.update())
    write_run(result, out_dir)
    print_run(result)
    print(f"results: {out_dir}")


@hydra.main(version_base=None, config_path="pkg://conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run_cli(lambda: run(cfg))


if __name__ == "__main__":
    run_cli(lambda: check_policy_names(sys.argv[1:]))
    main()
