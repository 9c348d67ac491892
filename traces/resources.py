"""Up-front checks for commands that need a GPU or a lot of memory: refuse in one line, before the
work starts, rather than fall back to the CPU silently or be killed by the kernel hours in.
"""
from __future__ import annotations

import os
from pathlib import Path

from traces.errors import UserError

GB = 1e9


def available_memory_bytes() -> int:
    """Memory this process can still take: the kernel's MemAvailable, within a cgroup's limit."""
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def require_memory(what: str, needed_bytes: float, fix: str, available: int | None = None) -> None:
    """UserError when `what` needs more host memory than is available now."""
    available = available_memory_bytes() if available is None else available
    if needed_bytes > available:
        raise UserError(f"{what} needs about {needed_bytes / GB:.1f} GB of memory, this machine has "
                        f"{available / GB:.1f} GB available; {fix}")


def require_gpu(what: str, device: str, cpu_hint: str) -> None:
    """UserError when a command meant for a GPU is asked for one (device auto or cuda) and none is here."""
    if device not in ("auto",) and not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"{what} runs on a GPU and this machine has none (device={device}); {cpu_hint}")
