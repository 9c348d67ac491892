"""A run's output directory: what a run that failed leaves behind (nothing).

Hydra creates the directory, its .hydra/ and an empty log before the run starts; a run refused
for bad input would leave them, and sim.results would count it as an incomplete run to restart.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from sim.report import METRICS_FILE

HYDRA_LEFTOVERS = (".hydra",)


def discard_failed_run(out_dir: str | Path, root: str | Path = ".") -> None:
    """Remove what Hydra made for a run that failed: its .hydra/, its log, then the directory and
    its parents inside root while they are empty. A directory holding complete results (of an
    earlier run) keeps them."""
    out, root = Path(out_dir).resolve(), Path(root).resolve()
    if (out / METRICS_FILE).is_file() or not out.is_dir():
        return
    for name in HYDRA_LEFTOVERS:
        shutil.rmtree(out / name, ignore_errors=True)
    for log in out.glob("*.log"):
        log.unlink(missing_ok=True)
    while out != root and root in out.parents and out.is_dir() and not any(out.iterdir()):
        out.rmdir()
        out = out.parent
