"""The command lines' Hydra configs: config.yaml (python -m sim), realrun.yaml, and the groups they
compose (policy/, tune/, hydra/launcher/). The model and hardware profiles sit outside, in conf/model
and conf/hardware, so that `model=` and `hardware=` are plain settings: a profile's name or a path."""
