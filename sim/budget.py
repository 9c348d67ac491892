"""Expert-memory budgets given as sizes with units (6GB, 512MiB) or as expert counts (128experts)."""
from __future__ import annotations

import re

from sim.errors import ConfigError

UNITS = {
    "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_HINT = "use a size like 6GB, 512MiB, 1.5GiB or an expert count like 128experts"


def parse_budget(text: str | int | float, bytes_per_expert: int) -> int:
    """Budget in bytes; 'GB' is 10^9 bytes and 'GiB' 2^30, as in the papers' '6 GB'."""
    if isinstance(text, bool):
        raise ConfigError(f"budget {text!r} is not a size; {_HINT}")
    if isinstance(text, (int, float)):
        value, unit = float(text), "B"
    else:
        match = _PATTERN.match(str(text))
        if not match:
            raise ConfigError(f"budget '{text}' is not a size; {_HINT}")
        value, unit = float(match.group(1)), match.group(2) or "B"
    key = unit.upper()
    if key in ("EXPERT", "EXPERTS"):
        if value != int(value):
            raise ConfigError(f"budget '{text}': a whole number of experts is needed; {_HINT}")
        budget = int(value) * bytes_per_expert
    elif key in UNITS:
        budget = int(value * UNITS[key])
    else:
        raise ConfigError(f"budget '{text}': unknown unit '{unit}'; {_HINT}")
    if budget < bytes_per_expert:
        raise ConfigError(f"budget '{text}' ({budget:,} bytes) is below one expert ({bytes_per_expert:,} bytes); "
                          "give at least 1expert")
    return budget


def format_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"
