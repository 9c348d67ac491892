"""The interface between an offloading policy and an engine (the SimPy simulator or realrun).

An engine owns the expert cache, the copy queue and the budget; it calls the same policy object in
the same order whichever engine it is, so decisions can be compared one by one. A policy reacts to
events and answers with decisions; it never moves bytes, never reads an engine's clock and never
sees the future of the trace, except the oracles, which set `reads_future` and say so.

Units of caching are blocks: (layer, expert, part). Part 0 is the whole expert unless the policy
splits experts (`parts()`, MoEpic); then an expert is usable once all its parts are resident.

Order of calls for each request (a prefill step when the trace has one, then one decode step per
output token):

    on_request_start(request)                      -> PrefetchPlan | None
    per step:   on_step_start(step)                -> PrefetchPlan | None
        per layer (after its attention and router have run):
                    on_layer_start(step, layer, probs, experts)  -> PrefetchPlan | None
                    the engine queues the layer's demand copies, then the plan's prefetches
                    choose_victims(...) before every copy starts (the library's loop over
                    eviction_order(...), the policy's ranking)
                    on_copy_done(block, prefetched) when a copy lands
                    on_copy_cancelled(block) when a prefetch it asked for will not land
        on_step_end(step)
    on_request_end(request)
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Iterator, Protocol

import numpy as np

from policies.victims import until_fits

if TYPE_CHECKING:
    from traces import ModelSpec, Trace

Block = tuple[int, int, int]  # (layer, expert, part)
DEMAND_PRIORITY = float("inf")


def known_probs(probs: np.ndarray) -> np.ndarray:
    """Router probabilities [..., experts] with the unknown ones (NaN: a topm trace did not record
    them, traces.format) replaced by the one estimate every policy uses: the row's unrecorded mass
    (1 - recorded sum, at least 0) shared equally by its unknown experts, and never more than the
    smallest recorded probability (they were not among the m most probable). A policy that reads
    probability values goes through here, never np.nan_to_num: an unknown probability is not
    "never chosen". Where the recorded weights were renormalised to sum to 1 (the gpt-oss and
    Mixtral logs) the estimate is 0: the log holds no mass for them. Ranking by NaN-bearing rows
    (np.argsort(-probs), NaN last) needs no estimate. tests/test_unknown_probs.py checks that every
    registered policy behaves on a trace with unknowns exactly as on the same trace with this estimate
    written in."""
    unknown = np.isnan(probs)
    if not unknown.any():
        return probs
    known = np.where(unknown, 0.0, probs).astype(np.float32, copy=False)
    missing = unknown.sum(axis=-1, keepdims=True)
    # np.maximum is what np.clip(x, 0.0, None) calls, without its Python wrapper (this runs every layer)
    share = np.maximum(1.0 - known.sum(axis=-1, keepdims=True), 0.0) / np.maximum(missing, 1)
    # fmin passes over NaN: the smallest recorded probability, inf where none is (a third of a masked minimum's time)
    floor = np.fmin.reduce(probs, axis=-1, keepdims=True, initial=np.inf)
    # the estimate rounded to float32 per row, not the whole array carried in float64 (a training
    # split's probabilities are millions)
    return np.where(unknown, np.minimum(share, floor).astype(np.float32), known)


class PrefetchPlan:
    """Blocks to copy ahead of use, each with a priority (higher is copied first).

    An entry is (block, priority), copied into the cache of the block's home GPU, or (block,
    priority, gpu) to stage it in another GPU's cache, from where its home can later fetch it over
    NVLink. replace=True first cancels every queued prefetch that has not started (MoE-Infinity and
    FineMoE replace their queue after each layer); copies already on a link finish.

    cpu (only in on_layer_start's answer, only for policies that set uses_cpu): experts of this
    layer whose work for this pass runs on the host CPU instead (sim.host_cpu); their weights are
    neither copied nor pinned, the hidden state goes down and the results come up, and the layer
    waits for the CPU and the GPU, which compute meanwhile.

    of_arrays() makes the same plan of part-0 blocks from numpy arrays, for policies that rank
    with numpy: `blocks` lists them only when read, and the layer protocol skips a one-GPU plan's
    resident blocks with one lookup (most of a replanned queue is resident already).
    """

    __slots__ = ("_blocks", "replace", "cpu", "arrays")

    def __init__(self, blocks: list[tuple] | None = None, replace: bool = False, cpu: tuple[int, ...] = ()):
        self._blocks = [] if blocks is None else blocks
        self.replace = replace
        self.cpu = cpu
        self.arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @classmethod
    def of_arrays(cls, layers: np.ndarray, experts: np.ndarray, priorities: np.ndarray,
                  replace: bool = False) -> PrefetchPlan:
        """Entries ((layers[i], experts[i], 0), priorities[i]) in this order; int64 and float arrays."""
        plan = cls(replace=replace)
        plan._blocks = None
        plan.arrays = (layers, experts, priorities)
        return plan

    @property
    def blocks(self) -> list[tuple]:
        if self._blocks is None:
            layers, experts, priorities = self.arrays
            self._blocks = list(zip(zip(layers.tolist(), experts.tolist(), itertools.repeat(0)), priorities.tolist()))
        return self._blocks

    def __repr__(self) -> str:
        return f"PrefetchPlan(blocks={self.blocks!r}, replace={self.replace!r}, cpu={self.cpu!r})"


@dataclass(frozen=True, slots=True)
class RequestInfo:
    index: int  # row of the request in the trace
    request_id: str
    prompt_tokens: int
    output_tokens: int
    embedding: np.ndarray | None  # prompt embedding, where the trace has one


@dataclass(slots=True)
class Step:
    """One forward pass over every layer: a request's prefill, or one decode iteration of a batch."""

    index: int  # position in the run, from 0
    kind: str  # "prefill" | "decode"
    requests: tuple[int, ...]  # trace indices of the requests in the pass
    token_request: np.ndarray  # for each row of `probs`, the position in `requests` it belongs to
    lookahead: Any = None  # callable layer -> [tokens, distance, experts] or None (speculative gates)
    hidden: Any = None  # callable layer -> [tokens, dim] or None (projection of the hidden state entering the layer)
    expert_tokens: Any = None  # callable layer -> tokens per needed expert (in the order given), or None: one each
    known: Any = None  # callable layer -> known_probs of the layer's probs, made for the whole pass at once; or None


def layer_known_probs(step: Step, layer: int, probs: np.ndarray) -> np.ndarray:
    """known_probs(probs) of the probabilities on_layer_start was given for `layer`: from the
    engine's estimate for the whole pass where the step has one (the same values, row by row; one
    call a pass instead of one a layer)."""
    return known_probs(probs) if step.known is None else step.known(layer)


class CacheView(Protocol):
    """What a policy may see of one GPU's expert cache."""

    capacity_bytes: int

    def free_bytes(self) -> int: ...
    def block_bytes(self, block: Block) -> int: ...
    def is_resident(self, block: Block) -> bool: ...
    def is_in_flight(self, block: Block) -> bool: ...
    def is_evictable(self, block: Block) -> bool: ...
    def resident_blocks(self) -> Iterator[Block]: ...
    def resident_table(self) -> tuple[np.ndarray, np.ndarray]: ...  # (layer, expert, part, code) columns, evictable


class FutureView(Protocol):
    """The replay's whole sequence of expert uses; given only to policies that set reads_future.

    Positions count layer-iterations in replay order: step * num_layers + layer.
    """

    num_layers: int
    num_steps: int

    def position(self, step: int, layer: int) -> int: ...
    def step_experts(self, step: int) -> list[tuple[int, ...]]: ...
    def uses_of(self, layer: int, expert: int) -> np.ndarray: ...
    def next_use(self, layer: int, expert: int, after: int) -> float: ...


@dataclass(frozen=True)
class Timing:
    """Profiled costs in seconds, for policies that plan with them (MoEpic's cache configuration)."""

    copy_s: Callable[[float], float]  # bytes -> one host-to-GPU copy
    expert_s: Callable[[int], float]  # tokens -> one expert's FFN
    non_expert_s: Callable[[int], float]  # tokens -> one layer's attention and router
    cpu_expert_s: Callable[[int], float] | None = None  # tokens -> one expert's FFN on the host CPU; None: no CPU
    activation_s: Callable[[int], float] | None = None  # tokens -> hidden state down plus results up the host link


@dataclass
class PolicyContext:
    model: ModelSpec
    caches: list[CacheView]  # one per GPU
    home: Callable[[int, int], int]  # (layer, expert) -> the GPU whose cache serves it
    layers_of: Callable[[int], list[int]]  # GPU -> the layers with experts on it
    rng: np.random.Generator
    future: FutureView | None = None
    timing: Timing | None = None

    def cache_of(self, layer: int, expert: int = 0) -> CacheView:
        return self.caches[self.home(layer, expert)]


class Policy:
    """Base class: a demand-only cache that evicts the lowest `eviction_key` first.

    Subclasses override the hooks they need; each lives in its own module and registers itself
    with @register("name").
    """

    name: ClassVar[str] = "base"
    reads_future: ClassVar[bool] = False  # oracles only: may read ctx.future
    ignores_budget: ClassVar[bool] = False  # bounds only: every expert resident from the start
    compute_order: ClassVar[str] = "index"  # "index" (as transformers loops) or "availability"
    copy_chunks: ClassVar[int] = 1  # >1: copies in chunks, a demand preempts a prefetch between chunks
    # True: a layer gathers all its experts before computing, routed or not, as parameter-offloading
    # engines do (DeepSpeed ZeRO-Inference); ignored when the budget cannot hold a whole layer.
    loads_whole_layer: ClassVar[bool] = False
    needs_training: ClassVar[bool] = False  # learns offline in fit(): a run needs a training split
    # What the policy is, for the fast engine (sim.fast.engine.KINDS), declared on the class itself;
    # None: only the SimPy engine runs it.
    fast_path: ClassVar[str | None] = None
    preloads: ClassVar[bool] = False  # static placements: warm_blocks() are loaded before serving, warm_start or not
    uses_cpu: ClassVar[bool] = False  # may answer PrefetchPlan.cpu: needs a hardware profile with a cpu section

    ctx: PolicyContext

    def bind(self, ctx: PolicyContext) -> None:
        """Called once before the replay."""
        self.ctx = ctx

    def fit(self, trace: Trace, requests: list[int]) -> None:
        """Offline learning on the training split of a trace (disjoint from the replayed requests)."""

    def embedding_source(self, available: list[str]) -> str | None:
        """Which of the trace's prompt embeddings (`available`) RequestInfo carries; None: the trace's default."""
        return None

    def parts(self, layer: int) -> tuple[float, ...]:
        """Fractions an expert of this layer is split into; (1.0,) keeps experts whole."""
        return (1.0,)

    def warm_blocks(self, gpu: int) -> list[Block]:
        """Blocks to load into a GPU's cache before the first request when warm_start is on: an even
        share of its slots per layer, lowest expert ids first."""
        ctx = self.ctx
        layers = ctx.layers_of(gpu)
        cache = ctx.caches[gpu]
        homed = {layer: [e for e in range(ctx.model.num_experts) if ctx.home(layer, e) == gpu] for layer in layers}
        slots = int(cache.capacity_bytes // cache.block_bytes((layers[0], homed[layers[0]][0], 0)))
        per_layer, extra = divmod(slots, len(layers))
        return [(layer, e, 0) for i, layer in enumerate(layers) for e in homed[layer][: per_layer + (i < extra)]]

    def on_request_start(self, request: RequestInfo) -> PrefetchPlan | None:
        return None

    def on_step_start(self, step: Step) -> PrefetchPlan | None:
        return None

    def on_layer_start(self, step: Step, layer: int, probs: np.ndarray, experts: tuple[int, ...]) -> PrefetchPlan | None:
        """The router of `layer` has run: probs [tokens, experts] of this pass, experts it needs."""
        return None

    def on_copy_done(self, block: Block, prefetched: bool) -> None:
        pass

    def on_copy_cancelled(self, block: Block) -> None:
        """A prefetch it asked for will not land: cancelled (a plan that replaces the queue, or its
        memory given to a demand) or dropped (no room could be made, or the policy declined it)."""

    def choose_victims(self, incoming: Block, need_bytes: int, cache: CacheView) -> list[Block] | None:
        """Called before every copy starts: blocks to evict so that `need_bytes` fit (the engine
        calls it even when they already fit, so per-layer quotas can evict). The library's loop
        (policies.victims.until_fits) over eviction_order(): a policy ranks there; it overrides this
        only to add to the choice (blocks it evicts whatever the need, a decline that depends on
        the victims, its own bookkeeping of them).

        None declines the copy (only honoured for prefetches). The engine checks that every victim
        is evictable and that enough room results.
        """
        order = self.eviction_order(incoming, need_bytes, cache)
        return None if order is None else until_fits(order, need_bytes, cache)

    def eviction_order(self, incoming: Block, need_bytes: int, cache: CacheView) -> Iterable[Block] | None:
        """The evictable blocks, best victim first (consumed lazily, only as far as needed); None
        declines the copy. Here: ascending eviction_key."""
        return sorted((b for b in cache.resident_blocks() if cache.is_evictable(b)), key=self.eviction_key)

    def eviction_key(self, block: Block) -> Any:
        return block

    def on_step_end(self, step: Step) -> None:
        pass

    def on_request_end(self, request: RequestInfo) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        """Extra figures for the report (predictor precision, chosen split ratios...)."""
        return {}
