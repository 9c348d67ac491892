"""MoEpic (Yan et al. 2025, arXiv 2509.08342): vertical expert split, cached top segments, next-layer prefetch.

Each expert of layer l is cut along its intermediate dimension into a top segment (fraction
theta_l: block (l, e, 0)) and a bottom segment (1 - theta_l: block (l, e, 1)). The cache keeps the
top segments of layer l's `slots_l` most used experts; a use then copies only the bottom, which
overlaps with computing the top. After layer l's router, the experts guessed for layer l+1
(policies.speculation) get their missing segments prefetched. When room is needed, bottoms go
first, then tops beyond their layer's slots, then the next layer's bottoms, then hot tops.

Cache configuration (fit, from the training split): a per-layer budget and theta that minimise the
modelled exposed copy time of a decode pass. With f_l(e) the probability that a pass uses expert e
at layer l, hot the slots_l most used, S an expert's bytes, g_l the recall of the next-layer guess
and tau_{l-1} the previous layer's duration:
    copy_l  = sum_e f_l(e) * copy_time(S * ((1 - theta) if e is hot else 1))
    stall_l = max(0, g_l * copy_l - tau_{l-1}) + max(0, (1 - g_l) * copy_l - theta * t_expert * sum_hot f_l)
Budgets are divided between layers by divide and conquer (cost tables of the two halves of a layer
range merged by min-plus convolution, recursively), and because each layer's cost depends on the
previous layer's duration (its compute plus its own stall), allocation and durations are iterated
to a fixed point. The paper publishes no code; this follows its abstract and the project's
policies.md, and the model above is this module's reconstruction. 2 * top_k experts of the budget
stay aside for bottoms and whole misses. Without a training split: theta everywhere, even budgets.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from policies.base import Block, CacheView, Policy, PolicyContext, PrefetchPlan, Step
from policies.registry import register
from policies.speculation import NextLayerGuess
from policies.victims import ranked
from traces import Trace
from traces.format import tally_experts

GRID = 10  # theta in tenths; budgets in tenths of an expert


def merge_tables(a: np.ndarray, b: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Min-plus convolution: best[x] = min_y a[y] + b[x - y] for x < size, and the y chosen."""
    total = np.full((len(a), min(size, len(a) + len(b) - 1)), np.inf)
    for y in range(len(a)):
        span = min(len(b), total.shape[1] - y)
        if span > 0:
            total[y, y: y + span] = a[y] + b[:span]
    choice = np.argmin(total, axis=0)
    return total[choice, np.arange(total.shape[1])], choice


@register("moepic")
class MoEpic(Policy):
    def __init__(self, theta: float = 0.4, guesses: int | None = None, allocate: bool = True, max_rounds: int = 8):
        if not 0.0 < theta <= 1.0 or round(theta * GRID) != theta * GRID:
            raise ValueError(f"theta {theta} must be a multiple of 0.1 in (0, 1]")
        self.theta0, self.guesses, self.allocate, self.max_rounds = theta, guesses, allocate, max_rounds
        self.rounds = 0
        self.modelled_stall_s = float("nan")

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        m = ctx.model
        self.layers, self.experts, self.top_k = m.num_layers, m.num_experts, m.top_k
        self.guesses = self.guesses or m.top_k
        self.speculation = NextLayerGuess(m.num_layers, m.num_experts)
        self.uses = np.zeros((m.num_layers, m.num_experts), dtype=np.int64)
        self.tenths = [int(round(self.theta0 * GRID))] * m.num_layers
        units = self._top_units()
        share = units // m.num_layers
        self.slots = [min(m.num_experts, share // t) for t in self.tenths]
        self._now = 0
        # Each block's eviction group by (layer * experts + expert) * 2 + part (_groups); None: stale
        self._group: np.ndarray | None = None
        self._stale: set[int] = set()  # layers whose uses changed since _group was made
        self._marked = -1  # the layer whose bottoms _group marks as the next layer's

    def _top_units(self) -> int:
        """Tenths of an expert the budget leaves for top segments after the working room (MoEpic is
        a one-GPU design: with several GPUs, their budgets form one pool)."""
        expert = self.ctx.model.bytes_per_expert
        capacity = sum(c.capacity_bytes for c in self.ctx.caches)
        return max(0, int((capacity - 2 * self.top_k * expert) * GRID // expert))

    # --- cache configuration ---
    def fit(self, trace: Trace, requests: list[int]) -> None:
        model = trace.model
        passes = 0
        guessed = np.zeros(model.num_layers)
        for r in requests:
            offset, prefill, decode = trace.rows(r)
            chosen = np.asarray(trace.experts[offset + prefill: offset + prefill + decode], dtype=np.intp)
            self.uses += tally_experts(chosen, model.num_experts)
            self._group = None
            passes += len(chosen)
            guessed += self._guess_recall(trace, offset + prefill, chosen)
        if passes == 0 or not self.allocate or self.ctx.timing is None:
            return
        frequency = self.uses / passes  # probability that a pass uses each expert
        recall = guessed / (passes * model.top_k)
        self._configure(frequency, recall)

    def _guess_recall(self, trace: Trace, first_row: int, chosen: np.ndarray) -> np.ndarray:
        """Per layer, how many of the experts used were among the guesses made at the layer before
        (the same rule as the replay: lookahead gates when the trace has them, else the previous token)."""
        g = self.guesses
        hits = np.zeros(trace.model.num_layers)
        if trace.lookahead is not None:
            gates = np.asarray(trace.lookahead[first_row: first_row + len(chosen), :-1, 0], dtype=np.float32)
            guess = np.argsort(-gates, axis=-1, kind="stable")[..., :g]  # [passes, layers - 1, g]
            hits[1:] = (guess[..., :, None] == chosen[:, 1:, None, :]).any(-1).sum(axis=(0, 2))
        elif len(chosen) > 1:
            guess = chosen[:-1, 1:, :g]
            hits[1:] = (guess[..., :, None] == chosen[1:, 1:, None, :]).any(-1).sum(axis=(0, 2))
        return hits

    def _layer_table(self, freq: np.ndarray, recall: float, lead_s: float, units: int):
        """Cost (modelled stall, plus a little copy time to prefer less traffic) of one layer for each
        budget 0..units tenths, and the theta (in tenths) achieving it."""
        timing = self.ctx.timing
        expert = self.ctx.model.bytes_per_expert
        ranked = np.sort(freq)[::-1]
        hot_prefix = np.concatenate([[0.0], np.cumsum(ranked)])
        whole = timing.copy_s(expert)
        compute = timing.expert_s(1)
        budgets = np.arange(units + 1)
        best = np.full(units + 1, np.inf)
        best_tenths = np.full(units + 1, self.tenths[0])
        for tenths in range(1, GRID + 1):
            theta = tenths / GRID
            hot = np.minimum(budgets // tenths, self.experts)
            hot_f = hot_prefix[hot]
            bottom = timing.copy_s(expert * (1 - theta)) if tenths < GRID else 0.0
            copy = hot_f * bottom + (hot_prefix[-1] - hot_f) * whole
            stall = np.maximum(0, recall * copy - lead_s) + np.maximum(0, (1 - recall) * copy - theta * compute * hot_f)
            cost = stall + 1e-3 * copy
            better = cost < best - 1e-15
            best[better], best_tenths[better] = cost[better], tenths
        return best, best_tenths

    def _allocate(self, tables: list[np.ndarray], units: int) -> list[int]:
        """Budget per layer (tenths) minimising the summed cost: divide and conquer over layer ranges."""
        def solve(lo: int, hi: int) -> tuple[np.ndarray, object]:
            if hi - lo == 1:
                return tables[lo][: units + 1], lo
            mid = (lo + hi) // 2
            left, left_plan = solve(lo, mid)
            right, right_plan = solve(mid, hi)
            merged, choice = merge_tables(left, right, units + 1)
            return merged, (left_plan, right_plan, choice)

        budgets = [0] * len(tables)

        def assign(plan, budget: int) -> None:
            if isinstance(plan, int):
                budgets[plan] = budget
                return
            left_plan, right_plan, choice = plan
            assign(left_plan, int(choice[budget]))
            assign(right_plan, budget - int(choice[budget]))

        table, plan = solve(0, len(tables))
        assign(plan, int(np.argmin(table)))
        return budgets

    def _configure(self, frequency: np.ndarray, recall: np.ndarray) -> None:
        timing, model = self.ctx.timing, self.ctx.model
        units = self._top_units()
        base_s = timing.non_expert_s(1) + model.top_k * timing.expert_s(1)
        lead = np.zeros(model.num_layers)  # previous layer's duration; layer 0 gets no prefetch
        lead[1:] = base_s
        layout = None
        for self.rounds in range(1, self.max_rounds + 1):
            leaf_units = min(units, GRID * self.experts)  # beyond every expert whole, more budget buys nothing
            tables = [self._layer_table(frequency[l], recall[l], lead[l], leaf_units) for l in range(model.num_layers)]
            budgets = self._allocate([t[0] for t in tables], units)
            tenths = [int(tables[l][1][b]) for l, b in enumerate(budgets)]
            stalls = [self._layer_table(frequency[l], recall[l], lead[l], b)[0][b] for l, b in enumerate(budgets)]
            self.modelled_stall_s = float(sum(stalls))
            lead[1:] = base_s + np.asarray(stalls[:-1])
            if (budgets, tenths) == layout:
                break
            layout = (budgets, tenths)
        self.tenths = tenths
        self.slots = [min(self.experts, b // t) for b, t in zip(budgets, tenths)]

    def parts(self, layer: int) -> tuple[float, ...]:
        tenths = self.tenths[layer]
        return (1.0,) if tenths == GRID else (tenths / GRID, (GRID - tenths) / GRID)

    def warm_blocks(self, gpu: int) -> list[Block]:
        """The top segments of each layer's hottest experts."""
        ctx = self.ctx
        return [(l, int(e), 0) for l in ctx.layers_of(gpu)
                for e in np.argsort(-self.uses[l], kind="stable")[: self.slots[l]] if ctx.home(l, int(e)) == gpu]

    # --- the replay ---
    def on_layer_start(self, step: Step, layer: int, probs: np.ndarray, experts: tuple[int, ...]) -> PrefetchPlan | None:
        self._now = layer
        self.uses[layer, list(experts)] += 1
        self._stale.add(layer)
        self.speculation.observe(layer, experts)
        following = layer + 1
        if following == self.layers:
            return None
        nparts = 1 if self.tenths[following] == GRID else 2
        return PrefetchPlan([((following, e, p), 1.0) for e in self.speculation.guess(step, layer, self.guesses)
                             for p in range(nparts)])

    def eviction_order(self, incoming: Block, need_bytes: int, cache: CacheView) -> Iterator[Block]:
        """Bottoms first, then tops beyond their layer's slots, then the next layer's bottoms, then hot
        tops; the least used first within each group."""
        def order(layers, experts, parts):  # ranked only when a victim is needed
            flat = layers * self.experts + experts
            return self._groups()[flat * 2 + parts], self.uses.ravel()[flat]

        return ranked(cache, order)

    def _groups(self) -> np.ndarray:
        """Each block's group, by (layer * experts + expert) * 2 + part: a bottom 2 in the layer
        after the running one, else 0; a top 3 if among its layer's `slots` most used (stable
        ranks), else 1. Made whole after training, then the tops' only for the layers whose uses
        changed (each started layer) and the bottoms' as the running layer moves on."""
        e = self.experts
        if self._group is None:
            rank = np.argsort(np.argsort(-self.uses, axis=1, kind="stable"), axis=1)  # 0: most used of its layer
            self._group = np.zeros(self.layers * e * 2, dtype=np.int64)
            self._group[0::2] = np.where((rank < np.asarray(self.slots)[:, None]).ravel(), 3, 1)
            self._marked = -1
        else:
            for layer in self._stale:
                rank = np.argsort(np.argsort(-self.uses[layer], kind="stable"))
                self._group[2 * layer * e: 2 * (layer + 1) * e: 2] = np.where(rank < self.slots[layer], 3, 1)
        self._stale.clear()
        following = self._now + 1
        if following != self._marked:
            if 0 <= self._marked < self.layers:
                self._group[2 * self._marked * e + 1: 2 * (self._marked + 1) * e: 2] = 0
            if following < self.layers:
                self._group[2 * following * e + 1: 2 * (following + 1) * e: 2] = 2
            self._marked = following
        return self._group

    def describe(self) -> dict:
        return {"theta_per_layer": [t / GRID for t in self.tenths], "top_slots_per_layer": list(self.slots),
                "allocated": self.allocate and self.rounds > 0, "fixed_point_rounds": self.rounds,
                "modelled_stall_s": self.modelled_stall_s, "guessed_from": self.speculation.source}
