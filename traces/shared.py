"""One loaded copy of each trace per process, for sweeps over budgets and policies.

Keyed by the trace directory and its files' sizes and modification times: a trace rewritten in
place is loaded again. Loaded traces are read-only to their users (the engines and policies only
read them), so sharing one is safe.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from traces import Trace, load_trace

KEEP = 4  # traces kept loaded (memory-mapped arrays, so a few cost little)
_loaded: OrderedDict[tuple, Trace] = OrderedDict()


def _key(path: Path) -> tuple:
    path = path.resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
    return (str(path),) + tuple((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files)


def shared_trace(path: str | Path) -> Trace:
    """load_trace(path), or the copy already loaded when the trace's files have not changed."""
    path = Path(path)
    key = _key(path)
    trace = _loaded.get(key)
    if trace is None:
        trace = load_trace(path)
        _loaded[key] = trace
        while len(_loaded) > KEEP:
            _loaded.popitem(last=False)
    _loaded.move_to_end(key)
    return trace
