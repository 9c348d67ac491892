"""Writing a file so that a crash never leaves it half-written: a temporary name, then a rename."""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_text(path: Path, text: str) -> None:
    tmp = _temporary(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write_csv(path: Path, frame: pd.DataFrame) -> None:
    tmp = _temporary(path)
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)
