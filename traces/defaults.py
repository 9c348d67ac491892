"""The trace shipped inside the package, so the simulator runs with no arguments on a fresh machine."""
from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_TRACE = "mixtral-8x7b-sharegpt-synth"  # why: docs/realism.md


def shipped_traces() -> list[str]:
    return sorted(p.name for p in DATA_DIR.iterdir() if (p / "meta.json").is_file()) if DATA_DIR.is_dir() else []


def resolve_trace(name_or_path: str) -> Path:
    """'default', a shipped trace's name, or a path to a trace directory."""
    if name_or_path == "default":
        return DATA_DIR / DEFAULT_TRACE
    shipped = DATA_DIR / name_or_path
    if (shipped / "meta.json").is_file():
        return shipped
    return Path(name_or_path)
