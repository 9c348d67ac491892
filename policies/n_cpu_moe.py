"""llama.cpp's --n-cpu-moe N: the experts of the first N layers stay in host memory and compute on
the CPU; every other layer's experts live on the GPU. layers="fit" picks the smallest N whose GPU
layers fit the budget, as llama.cpp's --fit does with device memory (llama-fit-params). A given N
too small for the budget leaves some GPU layers' experts out; those are copied on demand.
"""
from __future__ import annotations

from policies.hybrid import COPY, CPU, StaticPlacement
from policies.registry import register


@register("n_cpu_moe")
class NCpuMoe(StaticPlacement):
    def __init__(self, layers: int | str = "fit"):
        if layers != "fit" and (not isinstance(layers, int) or layers < 0):
            raise ValueError(f"layers={layers!r}: a number of layers >= 0, or 'fit'")
        self.layers = layers

    def _fit(self) -> int:
        ctx, model = self.ctx, self.ctx.model
        for n in range(model.num_layers + 1):
            need = {g: 0 for g in range(len(ctx.caches))}
            for l in range(n, model.num_layers):
                for e in range(model.num_experts):
                    need[ctx.home(l, e)] += ctx.cache_of(l, e).block_bytes((l, e, 0))
            if all(need[g] <= c.capacity_bytes for g, c in enumerate(ctx.caches)):
                return n
        return model.num_layers

    def ranking(self) -> list[tuple[int, int]]:
        model = self.ctx.model
        self.n = min(self._fit() if self.layers == "fit" else self.layers, model.num_layers)
        gpu = [(l, e) for l in range(self.n, model.num_layers) for e in range(model.num_experts)]
        return gpu + [(l, e) for l in range(self.n) for e in range(model.num_experts)]

    def _place(self) -> None:
        super()._place()
        self.placed = {k for k in self.placed if k[0] >= self.n}  # the first N layers never go to the GPU

    def elsewhere(self, layer: int, expert: int, tokens: int) -> str:
        return CPU if layer < self.n else COPY

    def describe(self) -> dict:
        return {**super().describe(), "n_cpu_moe": self.n}
