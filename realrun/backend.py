"""Where realrun's tensors live and how its asynchronous work is ordered.

On a CUDA device: a compute stream and a copy stream, and events to know when work on either is
done. On the CPU (CI has no GPU) the same calls run synchronously: copies become host copies and
every event is complete as soon as it is recorded, so the executor's scheduling logic runs
unchanged, with meaningless timings.
"""
from __future__ import annotations

import contextlib
from typing import Protocol

import torch

from traces.errors import UserError


class Event(Protocol):
    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


class DoneEvent:
    """What a CPU backend records: work on the CPU is finished when the call returns."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


DONE = DoneEvent()


def resolve_device(name: str) -> str:
    """'auto' picks the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{name}' asked for, but this torch ({torch.__version__}) sees no CUDA device; "
                        "use device=cpu (decisions only, timings meaningless) or run on a GPU machine")
    return "cuda:0" if name == "cuda" else name


class Backend:
    def __init__(self, device: str):
        self.device = torch.device(resolve_device(device))
        self.is_cuda = self.device.type == "cuda"
        if self.is_cuda:
            torch.cuda.set_device(self.device)
            self.compute_stream = torch.cuda.Stream(self.device)
            self.copy_stream = torch.cuda.Stream(self.device)
        else:
            self.compute_stream = self.copy_stream = None

    @property
    def name(self) -> str:
        if self.is_cuda:
            return torch.cuda.get_device_name(self.device)
        return "cpu"

    def empty(self, nbytes: int) -> torch.Tensor:
        """Raw device memory (uint8)."""
        return torch.empty(int(nbytes), dtype=torch.uint8, device=self.device)

    def pinned(self, nbytes: int) -> torch.Tensor:
        """Host memory the copy engine can read asynchronously (page-locked on CUDA)."""
        return torch.empty(int(nbytes), dtype=torch.uint8, pin_memory=self.is_cuda)

    def on_compute(self):
        return torch.cuda.stream(self.compute_stream) if self.is_cuda else contextlib.nullcontext()

    def on_copy(self):
        return torch.cuda.stream(self.copy_stream) if self.is_cuda else contextlib.nullcontext()

    def record_compute(self) -> Event:
        """An event that completes when the compute work launched so far has finished."""
        return self._record(self.compute_stream)

    def record_copy(self, blocking: bool = False) -> Event:
        """An event that completes when the copies issued so far have landed; `blocking`: one that
        the host can sleep on (event.synchronize() then yields the thread instead of spinning)."""
        return self._record(self.copy_stream, blocking)

    def _record(self, stream, blocking: bool = False) -> Event:
        if not self.is_cuda:
            return DONE
        event = torch.cuda.Event(blocking=blocking)
        event.record(stream)
        return event

    def copy_waits_for(self, event: Event | None) -> None:
        """Later copies start only after `event` (compute that last read a slot about to be overwritten)."""
        if self.is_cuda and event is not None and event is not DONE:
            self.copy_stream.wait_event(event)

    def compute_waits_for(self, event: Event) -> None:
        """Later compute starts only after `event` (another device's work on the hidden state)."""
        if self.is_cuda and event is not DONE:
            self.compute_stream.wait_event(event)

    def synchronize(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
