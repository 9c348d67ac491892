"""What produced a run's results besides its settings: the trace's content and the code's version.

A sweep or sim.reproduce skips a run already complete only when both are unchanged: a trace
rewritten in place, or code that changes results, makes the stored run stale, however equal the
settings. Written as provenance.json beside run_config.json.
"""
from __future__ import annotations

import hashlib
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

from traces.defaults import resolve_trace

PROVENANCE_FILE = "provenance.json"
ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("sim", "policies", "traces", "realrun", "conf")
SOURCE_SUFFIXES = (".py", ".yaml")
_CHUNK = 1 << 20


def _digest(paths: list[Path], root: Path) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


@lru_cache(maxsize=None)
def _trace_digest(path: Path, stamp: tuple) -> str:
    return _digest(sorted(p for p in path.rglob("*") if p.is_file()), path)


def trace_sha256(trace: str | Path) -> str:
    """The hash of every file of a trace directory (names and bytes); cached while sizes and times hold."""
    path = resolve_trace(str(trace)).resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file())
    stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _trace_digest(path, stamp)


@lru_cache(maxsize=None)
def code_version() -> str:
    """The package version and a hash of the source files (sim, policies, traces, realrun, conf): it
    changes with any edit, committed or not. The shipped trace data is hashed as traces, not here."""
    files = sorted(p for d in SOURCE_DIRS for p in (ROOT / d).rglob("*")
                   if p.suffix in SOURCE_SUFFIXES and p.is_file() and "data" not in p.relative_to(ROOT).parts)
    try:
        version = metadata.version("moe-offload-sim")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return f"{version}+src.{_digest(files, ROOT)[:16]}"


@lru_cache(maxsize=None)
def git_commit() -> str | None:
    """The checkout's commit, where there is one (recorded for the reader; code_version decides)."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def provenance(trace: str | Path) -> dict[str, Any]:
    return {"trace_sha256": trace_sha256(trace), "code_version": code_version(), "git_commit": git_commit()}


def same_provenance(stored: dict[str, Any], current: dict[str, Any]) -> bool:
    """The trace's content and the code's version decide; the commit is only recorded."""
    return all(stored.get(k) == current[k] for k in ("trace_sha256", "code_version"))
