"""Writing a file so that a crash never leaves it half-written: a temporary name, then a rename."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import pandas as pd


def write_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """write(temporary path), then rename it to path; the temporary never survives a failure."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(text))


def atomic_write_csv(path: Path, frame: pd.DataFrame) -> None:
    write_atomically(path, lambda tmp: frame.to_csv(tmp, index=False))
