"""python -m realrun +policy=lru +budget=6GB [trace=PATH] [realrun.layers=8] [realrun.device=cuda] [key=value ...]

The simulator's command line (python -m sim), run on this machine's GPU: the same settings, the
same output files (metrics.json, requests.csv, layers.csv, run_config.json) in the Hydra output
directory, with measured instead of simulated times. Sweeps: -m +policy=lru,belady +budget=2GB,6GB.
"""
from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from realrun.api import execute_real
from realrun.executor import Machine, RealOptions
from realrun.subset import first_layers
from sim.api import prepare
from sim.cli import check_arguments, config_from_hydra
from sim.report import print_run, write_run
from traces import load_trace
from traces.cli import run_cli
from traces.defaults import resolve_trace


def register() -> None:
    """The `realrun` node of conf/cli/realrun.yaml from RealOptions' own defaults, so that no default is
    written twice: every field but seed (the random weights' seed, not a setting of this command), and
    layers, this command's own."""
    options = {k: v for k, v in asdict(RealOptions()).items() if k != "seed"}
    ConfigStore.instance().store(name="realrun_settings", node={"realrun": {**options, "layers": None}})


register()


def run(cfg: DictConfig) -> None:
    settings = OmegaConf.to_container(cfg, resolve=True)
    real = settings.pop("realrun")
    layers = real.pop("layers")
    sim_cfg = config_from_hydra(OmegaConf.create(settings))
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    trace = load_trace(resolve_trace(sim_cfg.trace))
    notes = []
    if layers is not None and layers < trace.model.num_layers:
        notes.append(f"only the first {layers} of {trace.model.num_layers} layers ran (realrun.layers)")
        trace = first_layers(trace, int(layers), out_dir / "trace")
        sim_cfg.trace = str(trace.path)
    prepared = prepare(sim_cfg, trace)
    machine = Machine(prepared.model, RealOptions(**real))
    with tqdm(total=len(prepared.replay), desc=f"{sim_cfg.policy} {sim_cfg.budget} on {machine.device_name}",
              unit="req", disable=not cfg.get("progress", True), leave=False) as bar:
        result = execute_real(prepared, machine, on_request_done=lambda _r: bar.update(), notes=notes)
    write_run(result, out_dir)
    print_run(result)
    for note in result.metrics.policy_info["realrun"]:
        print(f"note: {note}")
    print(f"results: {out_dir}")


@hydra.main(version_base=None, config_path="pkg://conf.cli", config_name="realrun")
def main(cfg: DictConfig) -> None:
    run_cli(lambda: run(cfg))


if __name__ == "__main__":
    run_cli(lambda: check_arguments(sys.argv[1:], extra=("realrun",)))
    main()
