"""The SimPy simulator of offloaded MoE inference. Entry points: sim.api.simulate, python -m sim."""
