"""Writing so that a crash never leaves a half-written output: a temporary name, then a rename.

A temporary is `.NAME.tmp-PID.HOST` beside its destination (a replaced directory waits as
`.NAME.old-PID.HOST`). A writer killed outright (SIGKILL, the OOM killer, a power cut) cannot remove
its own; the next writer into the same folder removes those whose process is dead.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
from pathlib import Path
from typing import Any, Callable

import pandas as pd

HOST = socket.gethostname()
_LEFTOVER = re.compile(r"^\..+\.(?:tmp|old)-(\d+)(?:\.(.+))?$")


def temporary(path: Path, kind: str = "tmp") -> Path:
    """The name this process writes path under before renaming it into place."""
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}.{HOST}")


def alive(pid: int) -> bool:
    """Whether a process of this host with this id is running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporaries in folder left by writers of this host that are no longer running.
    Another host's (a shared filesystem) are left: whether their writer lives cannot be told here."""
    removed = []
    if not folder.is_dir():
        return removed
    for path in folder.glob(".*"):
        match = _LEFTOVER.match(path.name)
        if not match or (match[2] or HOST) != HOST or alive(int(match[1])):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def write_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """write(temporary path), then rename it to path; the temporary never survives a failure."""
    remove_stale_temporaries(path.parent)
    tmp = temporary(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(text))


def atomic_write_csv(path: Path, frame: pd.DataFrame) -> None:
    write_atomically(path, lambda tmp: frame.to_csv(tmp, index=False))
