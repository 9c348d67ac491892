"""Hydra configs and the YAML profiles (models, hardware, policies) they compose."""
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent
