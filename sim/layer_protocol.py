"""The engine-neutral half of running a layer, shared by the simulator and realrun.

Both engines call, for every layer: policy.on_layer_start(), then start_layer() with the plan it
returned (the layer's demand copies are queued before the plan's prefetches, so an idle link never
starts a prefetch for a later layer while this one waits), then wait for and compute the experts
in the returned order (each engine its own way: simulated time or CUDA events), then unpin.
Keeping this here is what makes the two engines take the same decisions for the same trace and
policy.

Progress: a layer pins all its blocks until it computes them, and its demand copies are queued in
the order it computes them (their rank), so a copy needs room beside the blocks held for experts it
computes later. When the compute order leaves no room for that (experts in parts, partly resident
or half copied, under a budget of a few experts), start_layer computes the experts holding memory
first; what still cannot fit is released by the copy scheduler when the copy comes up (sim.copy_scheduler).

`links` are the GPUs' copy schedulers (sim.copy_scheduler), one per GPU beside its cache;
`homes[i]` is the GPU whose cache serves experts[i].
"""
from __future__ import annotations

import itertools
import time
from typing import Callable, Sequence

import numpy as np

from policies.base import DEMAND_PRIORITY, Block, Policy, PrefetchPlan
from sim.cache import IN_FLIGHT, RESIDENT, ExpertCache, RunningLayer
from sim.copy_scheduler import CopyScheduler
from sim.errors import PolicyError
from sim.metrics import Recorder

HIT, LATE, MISS = 0, 1, 2
POLICY_HOOKS = ("on_request_start", "on_request_end", "on_step_start", "on_step_end", "on_layer_start")
HostObserver = Callable[[str, float], None]  # (call, seconds it took)
# What a transport that runs on the host's own thread (realrun's copy engine) reports a copy's launch
# as: host time inside the copy's own calibrated time, which the call that made it does not count.
LAUNCH = "copy_launch"


def apply_plan(plan: PrefetchPlan | None, policy: Policy, num_layers: int, links: Sequence[CopyScheduler], home) -> None:
    """Queue a policy's prefetches (after cancelling the queued ones if it replaces its plan).

    An entry (block, priority) goes to the block's home GPU; (block, priority, gpu) stages it in
    another GPU's cache, from where its home can later fetch it over NVLink.
    """
    if plan is None:
        return
    if plan.arrays is not None and len(links) == 1:
        _apply_arrays(plan, policy, num_layers, links[0])
        return
    if plan.replace:
        for link in links:
            link.cancel_prefetches()
    single = len(links) == 1
    for entry in plan.blocks:
        block, priority = entry[0], entry[1]
        if not 0 <= block[0] < num_layers or priority == DEMAND_PRIORITY:
            raise _bad_entry(policy, block, priority)
        gpu = entry[2] if len(entry) > 2 else 0 if single else home(block[0], block[1])
        link = links[gpu]
        # Most of a replanning policy's entries are resident already: a resident block is neither
        # queued nor copying, so fetch() would ignore it; skipping it here saves the calls.
        if link.cache.state(block) != RESIDENT:
            link.fetch(block, priority)


def _apply_arrays(plan: PrefetchPlan, policy: Policy, num_layers: int, link: CopyScheduler) -> None:
    """apply_plan of a plan of arrays on one GPU: the same fetches in the same order, the resident
    blocks skipped by one lookup. What is resident changes only when a copy starts (its victims
    leave), and a fetch starts one only while the link is idle: so the lookup is made again once,
    after the fetch that made the link busy, for the entries after it, which are then queued at once."""
    layers, experts, priorities = plan.arrays
    bad = (layers < 0) | (layers >= num_layers) | (priorities == DEMAND_PRIORITY)
    if bad.any():
        i = int(np.argmax(bad))
        raise _bad_entry(policy, (int(layers[i]), int(experts[i]), 0), float(priorities[i]))
    if plan.replace:
        link.cancel_prefetches()
    cache = link.cache
    missing = (~cache.resident_mask(layers, experts)).nonzero()[0]
    fetched = 0
    while fetched < len(missing) and link.current is None:
        i = int(missing[fetched])
        link.fetch((int(layers[i]), int(experts[i]), 0), float(priorities[i]))
        fetched += 1
    if fetched == len(missing):
        return
    if fetched:  # a copy started: the rest is looked up after its victims left
        after = int(missing[fetched - 1]) + 1
        missing = after + (~cache.resident_mask(layers[after:], experts[after:])).nonzero()[0]
    wanted = priorities[missing]
    link.fetch_plan(list(zip(layers[missing].tolist(), experts[missing].tolist(), itertools.repeat(0))),
                    wanted.tolist(), bool((wanted[1:] <= wanted[:-1]).all()))


def _bad_entry(policy: Policy, block: Block, priority: float) -> PolicyError:
    return PolicyError(f"policy '{policy.name}' asked to prefetch {block} at priority {priority}: "
                       "layer out of range, or at demand priority")


def chunk_landed(link: CopyScheduler) -> None:
    """A copy's chunk has landed on the link: commit it, tell the policy, start the next copy (whose
    victims the policy ranks then)."""
    link.chunk_landed()


def start_layer(layer: int, experts: tuple[int, ...], homes: list[int], nparts: int, caches: Sequence[ExpertCache],
                links: Sequence[CopyScheduler], rec: Recorder, policy: Policy, bytes_per_expert: int,
                plan: PrefetchPlan | None, num_layers: int, home) -> tuple[list[list[Block]], list[int]]:
    """Classify each needed expert (hit / late prefetch / miss), pin its blocks, choose the compute
    order, issue demand copies for what is missing, then queue the plan's prefetches.
    Returns (blocks per expert, compute order). A policy that gathers whole layers adds the layer's
    other experts after the routed ones (blocks beyond len(experts), their GPUs appended to
    `homes`): they are loaded and waited for before any compute, but neither computed nor counted."""
    blocks = [[(layer, e, 0)] for e in experts] if nparts == 1 else \
        [[(layer, e, p) for p in range(nparts)] for e in experts]
    rank = []
    for expert_blocks, gpu in zip(blocks, homes):
        cache = caches[gpu]
        states = [cache.state(b) for b in expert_blocks]
        if states.count(RESIDENT) == nparts:
            rec.hits[layer] += 1
            if not cache.unused_prefetched.isdisjoint(expert_blocks):
                rec.prefetch_hits[layer] += 1
            rank.append(HIT)
        elif IN_FLIGHT in states or any(b in links[gpu].queue for b in expert_blocks):
            rec.late[layer] += 1
            rank.append(LATE)
        else:
            rec.misses[layer] += 1
            rank.append(MISS)
        for b in expert_blocks:
            cache.pin(b)
    rec.uses[layer] += len(experts)
    rec.layer_iterations += 1

    order = list(range(len(experts)))
    if any(rank):
        if policy.compute_order == "availability" or any(
                homes.count(g) * bytes_per_expert > caches[g].capacity_bytes for g in set(homes)):
            # Resident first, then in flight, then missing: overlaps compute with copies, and never
            # waits on a copy that needs memory held by a later expert of the same layer.
            order.sort(key=rank.__getitem__)
        if any(homes.count(g) * (bytes_per_expert + nparts) > caches[g].capacity_bytes for g in set(homes)) \
                and not _completes(order, blocks, homes, caches):  # (parts may round up to a byte each)
            # Experts in parts: a partly resident expert ranks as missing, a queued prefetch as in
            # flight; the order above would wait for a copy with no room left beside what later
            # experts hold. Those holding memory go first then.
            order = _held_first(order, blocks, homes, caches)
    routed = len(experts)
    if policy.loads_whole_layer:
        order = _gather_entries(layer, experts, homes, nparts, caches, bytes_per_expert, policy, home, blocks) + order
    if len(order) > routed or any(rank):  # copies to wait for: the schedulers see the layer's plan (sim.copy_scheduler)
        for g in set(homes):
            caches[g].running_layer = RunningLayer(order, blocks, homes, g, routed)
    position = 0  # demand copies are ranked in the order the layer waits for them, a gather's last
    if any(rank):
        for i in order:
            if i < routed:
                cache = caches[homes[i]]
                for b in blocks[i]:
                    if rank[i] != HIT and not cache.is_resident(b):
                        links[homes[i]].fetch(b, DEMAND_PRIORITY, position)
                    position += 1
    else:
        position = sum(len(blocks[i]) for i in range(routed))
    for i in order[:len(order) - routed]:  # a whole-layer gather: pinned and demanded after the routed experts
        cache = caches[homes[i]]
        for b in blocks[i]:
            cache.pin(b)
            if not cache.is_resident(b):
                links[homes[i]].fetch(b, DEMAND_PRIORITY, position)
            position += 1
    apply_plan(plan, policy, num_layers, links, home)
    return blocks, order


def _completes(order: list[int], blocks: list[list[Block]], homes: list[int], caches: Sequence[ExpertCache]) -> bool:
    """Whether each block still to copy fits beside the blocks held (resident or being copied, and
    pinned until computed) for the experts computed after it, on every GPU: otherwise the layer
    could never finish in this order."""
    later: dict[int, int] = {}
    for i in reversed(order):
        cache = caches[homes[i]]
        held = later.get(homes[i], 0)
        for b in reversed(blocks[i]):
            nbytes = cache.block_bytes(b)
            if cache.holds(b):
                held += nbytes
            elif nbytes + held > cache.capacity_bytes:
                return False
        later[homes[i]] = held
    return True


def _held_first(order: list[int], blocks: list[list[Block]], homes: list[int],
                caches: Sequence[ExpertCache]) -> list[int]:
    """The order with experts whose blocks are all held first, then those partly held (most held
    bytes first), then the rest; otherwise as before."""
    def key(i: int) -> tuple[int, int]:
        cache = caches[homes[i]]
        held = sum(cache.block_bytes(b) for b in blocks[i] if cache.holds(b))
        return (0 if all(cache.holds(b) for b in blocks[i]) else 1 if held else 2, -held)
    return sorted(order, key=key)


def _gather_entries(layer: int, experts: tuple[int, ...], homes: list[int], nparts: int,
                    caches: Sequence[ExpertCache], bytes_per_expert: int, policy: Policy, home,
                    blocks: list[list[Block]]) -> list[int]:
    """Add the layer's experts its router did not pick to `blocks` and `homes` (when each GPU can
    hold its share of the layer); returns their indices in `blocks`, to be waited for first."""
    routed = set(experts)
    others = [e for e in range(policy.ctx.model.num_experts) if e not in routed]
    gpus = [home(layer, e) for e in others]
    share = {g: (gpus + homes).count(g) for g in set(gpus)}
    if any(n * bytes_per_expert > caches[g].capacity_bytes for g, n in share.items()):
        return []
    first = len(blocks)
    for e, gpu in zip(others, gpus):
        blocks.append([(layer, e, p) for p in range(nparts)])
        homes.append(gpu)
    return list(range(first, len(blocks)))


def split_cpu(plan: PrefetchPlan | None, experts: tuple[int, ...], tokens: list[int] | None, policy: Policy,
              layer: int, rec: Recorder) -> tuple[tuple[int, ...], list[int] | None, list[int], list[int]]:
    """Split a layer's experts between the GPU and the host CPU by the plan's `cpu` field.
    Returns (GPU experts, their tokens or None, CPU experts, their tokens). A CPU expert's use
    counts as a miss (its weights were not on the GPU; they do not move) and as a CPU use."""
    cpu = () if plan is None else plan.cpu
    if not cpu:
        return experts, tokens, [], []
    if not policy.uses_cpu:
        raise PolicyError(f"policy '{policy.name}' sent experts to the CPU without setting uses_cpu")
    chosen = set(cpu)
    if not chosen.issubset(experts):
        raise PolicyError(f"policy '{policy.name}' sent experts {sorted(chosen - set(experts))} of layer {layer} "
                          "to the CPU, which the layer does not need")
    counts = [1] * len(experts) if tokens is None else tokens
    gpu = tuple(e for e in experts if e not in chosen)
    gpu_tokens = None if tokens is None else [t for e, t in zip(experts, tokens) if e not in chosen]
    cpu_experts = [e for e in experts if e in chosen]
    cpu_tokens = [t for e, t in zip(experts, counts) if e in chosen]
    rec.cpu_uses[layer] += len(cpu_experts)
    rec.uses[layer] += len(cpu_experts)
    rec.misses[layer] += len(cpu_experts)
    return gpu, gpu_tokens, cpu_experts, cpu_tokens


class HostCalls:
    """The host's decisions on the critical path, as every engine makes them: the policy's hooks
    (POLICY_HOOKS) and the layer protocol carrying them out (start_layer for a layer's experts,
    apply_plan for a request's or a pass's plan, chunk_landed for a copy's landing). Engines call
    them through here. With an observer,
    each call is reported to it with its duration (realrun.policy_host measures a policy's host time
    so); without one they are the plain functions, at no cost."""

    on_request_start: Callable
    on_request_end: Callable
    on_step_start: Callable
    on_step_end: Callable
    on_layer_start: Callable
    start_layer: Callable
    apply_plan: Callable
    chunk_landed: Callable

    def __init__(self, policy: Policy, observer: HostObserver | None = None):
        calls: dict[str, Callable] = {name: getattr(policy, name) for name in POLICY_HOOKS}
        calls |= {"start_layer": start_layer, "apply_plan": apply_plan, "chunk_landed": chunk_landed}
        for name, call in calls.items():
            setattr(self, name, call if observer is None else _timed(name, call, observer))


def _timed(name: str, call: Callable, observer: HostObserver) -> Callable:
    def timed(*args):
        started = time.perf_counter()
        result = call(*args)
        observer(name, time.perf_counter() - started)
        return result
    return timed
