"""The engine-neutral half of running a layer, shared by the simulator and realrun.

Both engines call, for every layer: policy.on_layer_start(), then start_layer() with the plan it
returned (the layer's demand copies are queued before the plan's prefetches, so an idle link never
starts a prefetch for a later layer while this one waits), then wait for and compute the experts
in the returned order (each engine its own way: simulated time or CUDA events), then unpin.
Keeping this here is what makes the two engines take the same decisions for the same trace and
policy.

A `link` is anything with the copy engine's surface: fetch(block, priority), cancel_prefetches(),
and a `queue` supporting `block in queue`. There is one cache and one link per GPU; `homes[i]` is
the GPU whose cache serves experts[i].
"""
from __future__ import annotations

from typing import Protocol, Sequence

from policies.base import DEMAND_PRIORITY, Block, Policy, PrefetchPlan
from sim.cache import IN_FLIGHT, RESIDENT, ExpertCache
from sim.errors import PolicyError
from sim.metrics import Recorder

HIT, LATE, MISS = 0, 1, 2


class CopyEngine(Protocol):
    queue: object

    def fetch(self, block: Block, priority: float) -> None: ...
    def cancel_prefetches(self) -> None: ...


def apply_plan(plan: PrefetchPlan | None, policy: Policy, num_layers: int, links: Sequence[CopyEngine], home) -> None:
    """Queue a policy's prefetches (after cancelling the queued ones if it replaces its plan).

    An entry (block, priority) goes to the block's home GPU; (block, priority, gpu) stages it in
    another GPU's cache, from where its home can later fetch it over NVLink.
    """
    if plan is None:
        return
    if plan.replace:
        for link in links:
            link.cancel_prefetches()
    for entry in plan.blocks:
        block, priority = entry[0], entry[1]
        if not 0 <= block[0] < num_layers or priority == DEMAND_PRIORITY:
            raise PolicyError(f"policy '{policy.name}' asked to prefetch {block} at priority {priority}: "
                              "layer out of range, or at demand priority")
        gpu = entry[2] if len(entry) > 2 else home(block[0], block[1])
        links[gpu].fetch(block, priority)


def start_layer(layer: int, experts: tuple[int, ...], homes: list[int], nparts: int, caches: Sequence[ExpertCache],
                links: Sequence[CopyEngine], rec: Recorder, policy: Policy, bytes_per_expert: int,
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
        for i in order:
            if rank[i] != HIT:
                cache = caches[homes[i]]
                for b in blocks[i]:
                    if not cache.is_resident(b):
                        links[homes[i]].fetch(b, DEMAND_PRIORITY)
    if policy.loads_whole_layer:
        order = _gather_layer(layer, experts, homes, nparts, caches, links, bytes_per_expert, policy, home, blocks) + order
    apply_plan(plan, policy, num_layers, links, home)
    return blocks, order


def _gather_layer(layer: int, experts: tuple[int, ...], homes: list[int], nparts: int,
                  caches: Sequence[ExpertCache], links: Sequence[CopyEngine], bytes_per_expert: int, policy: Policy,
                  home, blocks: list[list[Block]]) -> list[int]:
    """Pin and demand the layer's experts its router did not pick (when each GPU can hold its share
    of the layer); returns their indices in `blocks`, to be waited for first."""
    routed = set(experts)
    others = [e for e in range(policy.ctx.model.num_experts) if e not in routed]
    gpus = [home(layer, e) for e in others]
    share = {g: (gpus + homes).count(g) for g in set(gpus)}
    if any(n * bytes_per_expert > caches[g].capacity_bytes for g, n in share.items()):
        return []
    first = len(blocks)
    for e, gpu in zip(others, gpus):
        expert_blocks = [(layer, e, p) for p in range(nparts)]
        blocks.append(expert_blocks)
        homes.append(gpu)
        for b in expert_blocks:
            caches[gpu].pin(b)
            if not caches[gpu].is_resident(b):
                links[gpu].fetch(b, DEMAND_PRIORITY)
    return list(range(first, len(blocks)))
