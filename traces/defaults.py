"""The trace shipped inside the package, so the simulator runs with no arguments on a fresh machine."""
from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_TRACE = "mixtral-8x7b-sharegpt-synth"  # why: docs/realism.md


STANDIN_DIR = "standin"  # traces of the stand-in models trained here (traces.standin), named standin/NAME


def shipped_traces() -> list[str]:
    if not DATA_DIR.is_dir():
        return []
    return sorted(str(meta.parent.relative_to(DATA_DIR)) for meta in DATA_DIR.glob("*/meta.json")) + \
        sorted(str(meta.parent.relative_to(DATA_DIR)) for meta in DATA_DIR.glob(f"{STANDIN_DIR}/*/meta.json"))


def resolve_trace(name_or_path: str) -> Path:
    """'default', a shipped trace's name, or a path to a trace directory."""
    if name_or_path == "default":
        return DATA_DIR / DEFAULT_TRACE
    shipped = DATA_DIR / name_or_path
    if (shipped / "meta.json").is_file():
        return shipped
    return Path(name_or_path)
