"""The YAML profiles (models, hardware) and, in conf/cli, the Hydra configs of the command lines."""
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent
CLI_CONF_DIR = CONF_DIR / "cli"  # config.yaml, realrun.yaml, policy/, tune/, hydra/launcher/
