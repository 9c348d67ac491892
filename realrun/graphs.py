"""One-token decode passes launched as CUDA graphs (realrun.graphs=true), so that the host's
Python does not set the pace.

Eagerly, the executor launches a layer's ~10 non-expert kernels and each expert's ~6 one by one
from Python, and the GPU runs them as fast as they come (realrun/README.md, runs 7-10): the time
that is not spent waiting for copies is the host's, and it drifts from run to run. A graph is
one launch. Per device there is one graph per layer for the non-expert kernels and one per cache
place for an expert, all reading and writing two static buffers, the residual stream `x` and the
experts' input `y`:
    layer graph:   x, y = layer(x)           (attention, router; x is updated in place)
    expert graph:  x += expert_at_place(y)
Passes of more than one token (prefills, batches), and places no graph was captured for (unequal
MoEpic parts that slid), run eagerly on the same buffers. On the CPU a "graph" is the captured
function itself, called on replay: the data flow is the same, which is what the tests check.
"""
from __future__ import annotations

from typing import Callable

import torch

from realrun.backend import Backend
from realrun.kernels import ExpertFn, NonExpertLayer, expert_weights


class CudaGraph:
    def __init__(self, backend: Backend):
        self.graph, self.stream = torch.cuda.CUDAGraph(), backend.compute_stream

    def capture(self, work: Callable[[], None]) -> None:
        # Not torch.cuda.graph(): it empties the device and pinned-host caches before every capture,
        # slow for the ~100 graphs a run captures, and the caller has synchronised already.
        with torch.cuda.stream(self.stream):
            self.graph.capture_begin()
            work()
            self.graph.capture_end()

    def replay(self) -> None:
        self.graph.replay()  # on the current stream: the executor's compute stream


class CalledGraph:
    """The CPU's stand-in: replaying calls what was captured."""

    def __init__(self, _backend: Backend):
        self.work: Callable[[], None] | None = None

    def capture(self, work: Callable[[], None]) -> None:
        self.work = work

    def replay(self) -> None:
        self.work()


class DecodeGraphs:
    """The graphs of one device; capture_* after the kernels have run once (Machine.warm_up)."""

    def __init__(self, backend: Backend, hidden: int, expert: ExpertFn):
        """expert: the model's FFN, f(y, weights) (realrun.kernels.expert_fn)."""
        self.backend, self.hidden, self.expert_ffn = backend, hidden, expert
        self._graph = CudaGraph if backend.is_cuda else CalledGraph
        self.x = torch.zeros(1, hidden, dtype=torch.bfloat16, device=backend.device)
        self.y = torch.zeros(1, hidden, dtype=torch.bfloat16, device=backend.device)
        self._layers: dict[int, CudaGraph | CalledGraph] = {}
        self._experts: dict[tuple[int, int], CudaGraph | CalledGraph] = {}
        self.replays = 0
        self.eager = 0

    def _captured(self, work: Callable[[], None]) -> CudaGraph | CalledGraph:
        graph = self._graph(self.backend)
        self.backend.synchronize()  # nothing else may run on the device while it is captured
        graph.capture(work)
        return graph

    def capture_layers(self, layers: dict[int, NonExpertLayer]) -> None:
        for index, layer in layers.items():
            if index not in self._layers:
                def step(layer=layer) -> None:
                    h, y = layer.forward(self.x)
                    self.x.copy_(h)
                    self.y.copy_(y)
                self._layers[index] = self._captured(step)

    def capture_experts(self, places: list[torch.Tensor]) -> None:
        """One graph per cache place (the bytes an expert's weights occupy there)."""
        self._experts.clear()
        for place in places:
            weights = expert_weights(place)
            self._experts[self._key(weights)] = self._captured(lambda w=weights: self._expert(w))

    def drop_experts(self) -> None:
        """When the run's cache memory goes back (its places are gone)."""
        self._experts.clear()

    @staticmethod
    def _key(weights: torch.Tensor) -> tuple[int, int]:
        return weights.data_ptr(), weights.numel()

    def _expert(self, weights: torch.Tensor) -> None:
        self.x.add_(self.expert_ffn(self.y, weights))

    def non_expert(self, layer: int) -> None:
        self._layers[layer].replay()
        self.replays += 1

    def expert(self, weights: torch.Tensor) -> None:
        graph = self._experts.get(self._key(weights))
        if graph is None:
            self._expert(weights)
            self.eager += 1
        else:
            graph.replay()
            self.replays += 1
