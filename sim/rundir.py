"""A run's output directory: held by one process at a time, and left empty by a run that failed.

Hydra creates the directory, its .hydra/ and an empty log before the run starts; a run refused
for bad input would leave them, and sim.results would count it as an incomplete run to restart.
Two processes given the same directory (the same hydra.run.dir, or the same sweep run twice at
once) would mix their files; the second is refused while the first holds it.
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sim.errors import ConfigError
from sim.report import METRICS_FILE
from traces.atomic import HOST, alive

HYDRA_LEFTOVERS = (".hydra",)
CLAIM_FILE = ".running"  # PID.HOST of the process writing the directory


def _holder(claim: Path) -> tuple[int, str] | None:
    try:
        pid, _, host = claim.read_text().strip().partition(".")
        return int(pid), host
    except (OSError, ValueError):
        return None


@contextmanager
def claimed(out_dir: str | Path) -> Iterator[Path]:
    """Hold out_dir for this process (an exclusively created claim file), or refuse in one line when
    a live process holds it. A claim left by a process that died is taken over."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    claim = out / CLAIM_FILE
    for _ in range(2):
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = _holder(claim)
            if holder is not None and (holder[1] != HOST or alive(holder[0])):
                raise ConfigError(f"{out}: another run (process {holder[0]} on {holder[1]}) is writing this "
                                  "directory; give this one another hydra.run.dir, or wait for it") from None
            claim.unlink(missing_ok=True)  # its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}.{HOST}")
        break
    try:
        yield out
    finally:
        if _holder(claim) == (os.getpid(), HOST):
            claim.unlink(missing_ok=True)


def discard_failed_run(out_dir: str | Path, root: str | Path = ".") -> None:
    """Remove what Hydra made for a run that failed: its .hydra/, its log, its claim, then the
    directory and its parents inside root while they are empty. A directory holding complete
    results (of an earlier run) keeps them."""
    out, root = Path(out_dir).resolve(), Path(root).resolve()
    if (out / METRICS_FILE).is_file() or not out.is_dir():
        return
    for name in HYDRA_LEFTOVERS:
        shutil.rmtree(out / name, ignore_errors=True)
    for leftover in [*out.glob("*.log"), out / CLAIM_FILE]:
        leftover.unlink(missing_ok=True)
    while out != root and root in out.parents and out.is_dir() and not any(out.iterdir()):
        out.rmdir()
        out = out.parent
