"""The GPU's SM clock over time, read through NVML by a separate process.

A separate process, so that sampling takes no time from the executor's one thread (it polls CUDA
events in a busy loop; a sampling thread would contend for the GIL). Only changes are kept: the
clock moves in steps, and a run of seconds read every 0.2 ms would otherwise be tens of thousands
of equal rows. Times are time.perf_counter() of this host, the clock the executor and the
timeline use too. Without CUDA or NVML (nvidia-ml-py) the log is empty and says why.
"""
from __future__ import annotations

import multiprocessing
import time

import numpy as np
import pandas as pd

READY_TIMEOUT_S = 30.0


def _sample(index: int, interval_s: float, stop, conn) -> None:
    import pynvml
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    rows, last = [], None
    conn.send("ready")
    while not stop.is_set():
        now = time.perf_counter()
        sample = (pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
                  pynvml.nvmlDeviceGetCurrentClocksEventReasons(handle))
        if sample != last:
            rows.append((now, *sample))
            last = sample
        time.sleep(interval_s)
    rows.append((time.perf_counter(), *last))  # the value held up to the end
    conn.send(rows)
    pynvml.nvmlShutdown()


class ClockLog:
    """with ClockLog(0) as log: ...; log.samples: t_s (perf_counter), sm_mhz, event_reasons (NVML bits)."""

    def __init__(self, nvml_index: int = 0, interval_s: float = 2e-4, enabled: bool = True):
        self.nvml_index, self.interval_s = nvml_index, interval_s
        self.samples = pd.DataFrame({"t_s": [], "sm_mhz": [], "event_reasons": []})
        self.unavailable = None if enabled else "not asked for"
        self._process = None

    def __enter__(self) -> ClockLog:
        if self.unavailable is None:
            try:
                import pynvml  # noqa: F401  (only whether it is there: the sampler imports it)
            except ImportError:
                self.unavailable = "nvidia-ml-py (pynvml) is not installed"
        if self.unavailable is None:
            context = multiprocessing.get_context("spawn")
            self._stop = context.Event()
            self._conn, child = context.Pipe(duplex=False)
            self._process = context.Process(target=_sample, args=(self.nvml_index, self.interval_s, self._stop, child),
                                            daemon=True)
            self._process.start()
            if not self._conn.poll(READY_TIMEOUT_S):
                self._process.kill()
                self._process, self.unavailable = None, "the NVML sampler did not start"
            else:
                self._conn.recv()
        return self

    def __exit__(self, *exc) -> None:
        if self._process is None:
            return
        self._stop.set()
        rows = self._conn.recv() if self._conn.poll(READY_TIMEOUT_S) else []
        self._process.join(READY_TIMEOUT_S)
        self._process = None
        self.samples = pd.DataFrame(rows, columns=["t_s", "sm_mhz", "event_reasons"])


def mean_clock(samples: pd.DataFrame, start_s: float, end_s: float) -> float:
    """Time-weighted mean SM clock (MHz) over [start_s, end_s] from change-only samples; NaN when
    the log does not cover the interval."""
    t, mhz = samples["t_s"].to_numpy(), samples["sm_mhz"].to_numpy(dtype=float)
    if len(t) == 0 or start_s < t[0] or end_s > t[-1] or end_s <= start_s:
        return float("nan")
    edges = np.concatenate([[start_s], t[(t > start_s) & (t < end_s)], [end_s]])
    held = mhz[np.searchsorted(t, edges[:-1], side="right") - 1]  # the value each piece starts with
    return float(np.sum(held * np.diff(edges)) / (end_s - start_s))
