"""The traces shipped inside the package, so the simulator runs with no arguments on a fresh machine.

The default is real routing: gpt-oss-20b decoding answers to real benchmark prompts (docs: README,
"Traces"). The stand-in traces (standin/NAME, 19 MB) do not ship in the package: they live in the
source checkout's data/standin (or wherever MOE_STANDIN_DATA points), and tests needing them skip
without them.
"""
from __future__ import annotations

import os
from pathlib import Path

from traces.errors import UserError

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_TRACE = "gpt-oss-20b-benchmarks"  # real routing; why: README, "Traces"
STANDIN_DIR = "standin"  # traces of the stand-in models trained here (traces.standin), named standin/NAME


def standin_root() -> Path:
    return Path(os.environ.get("MOE_STANDIN_DATA") or Path(__file__).resolve().parents[1] / "data" / STANDIN_DIR)


def shipped_traces() -> list[str]:
    """Names of the package's traces, then the stand-in traces where present (standin/NAME)."""
    names = sorted(str(meta.parent.relative_to(DATA_DIR)) for meta in DATA_DIR.glob("*/meta.json")) \
        if DATA_DIR.is_dir() else []
    return names + sorted(f"{STANDIN_DIR}/{meta.parent.name}" for meta in standin_root().glob("*/meta.json"))


def resolve_trace(name_or_path: str) -> Path:
    """'default', a shipped trace's name, standin/NAME, or a path to a trace directory."""
    if name_or_path == "default":
        return DATA_DIR / DEFAULT_TRACE
    shipped = DATA_DIR / name_or_path
    if (shipped / "meta.json").is_file():
        return shipped
    prefix = f"{STANDIN_DIR}/"
    if name_or_path.startswith(prefix) and not Path(name_or_path).is_dir():
        standin = standin_root() / name_or_path[len(prefix):]
        if not (standin / "meta.json").is_file():
            raise UserError(f"trace '{name_or_path}': the stand-in traces are not installed here (looked in "
                            f"{standin_root()}); they ship in the source checkout's data/standin, or set "
                            "MOE_STANDIN_DATA to their directory")
        return standin
    return Path(name_or_path)
