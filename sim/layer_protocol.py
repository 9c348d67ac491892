"""The engine-neutral half of running a layer, shared by the simulator and realrun.

Both engines call, for every layer: policy.on_layer_start(), then start_layer() with the plan it
returned (the layer's demand copies are queued before the plan's prefetches, so an idle link never
starts a prefetch for a later layer while this one waits), then wait for and compute the experts
in the returned order (each engine its own way: simulated time or CUDA events), then unpin. Keeping this here is what makes the two engines
take the same decisions for the same trace and policy.

`link` is anything with the copy engine's surface: fetch(block, priority), cancel_prefetches(),
and a `queue` supporting `block in queue`.
"""
from __future__ import annotations

from typing import Protocol

from policies.base import DEMAND_PRIORITY, Block, Policy, PrefetchPlan
from sim.cache import IN_FLIGHT, RESIDENT, ExpertCache
from sim.errors import PolicyError
from sim.metrics import Recorder

HIT, LATE, MISS = 0, 1, 2


class CopyEngine(Protocol):
    queue: object

    def fetch(self, block: Block, priority: float) -> None: ...
    def cancel_prefetches(self) -> None: ...


def apply_plan(plan: PrefetchPlan | None, policy: Policy, num_layers: int, link_of_layer) -> None:
    """Queue a policy's prefetches (after cancelling the queued ones if it replaces its plan)."""
    if plan is None:
        return
    if plan.replace:
        for link in {id(l): l for l in map(link_of_layer, range(num_layers))}.values():
            link.cancel_prefetches()
    for block, priority in plan.blocks:
        if not 0 <= block[0] < num_layers or priority == DEMAND_PRIORITY:
            raise PolicyError(f"policy '{policy.name}' asked to prefetch {block} at priority {priority}: "
                              "layer out of range, or at demand priority")
        link_of_layer(block[0]).fetch(block, priority)


def start_layer(layer: int, experts: tuple[int, ...], nparts: int, cache: ExpertCache, link: CopyEngine,
                rec: Recorder, policy: Policy, bytes_per_expert: int, plan: PrefetchPlan | None,
                num_layers: int, link_of_layer) -> tuple[list[list[Block]], list[int]]:
    """Classify each needed expert (hit / late prefetch / miss), pin its blocks, choose the compute
    order, issue demand copies for what is missing, then queue the plan's prefetches.
    Returns (blocks per expert, compute order). A policy that gathers whole layers adds the layer's
    other experts after the routed ones (blocks beyond len(experts)): they are loaded and waited
    for before any compute, but not computed and not counted as uses."""
    blocks = [[(layer, e, 0)] for e in experts] if nparts == 1 else \
        [[(layer, e, p) for p in range(nparts)] for e in experts]
    rank = []
    for expert_blocks in blocks:
        states = [cache.state(b) for b in expert_blocks]
        if all(s == RESIDENT for s in states):
            rec.hits[layer] += 1
            if not cache.unused_prefetched.isdisjoint(expert_blocks):
                rec.prefetch_hits[layer] += 1
            rank.append(HIT)
        elif IN_FLIGHT in states or any(b in link.queue for b in expert_blocks):
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
        if policy.compute_order == "availability" or len(experts) * bytes_per_expert > cache.capacity_bytes:
            # Resident first, then in flight, then missing: overlaps compute with copies, and never
            # waits on a copy that needs memory held by a later expert of the same layer.
            order.sort(key=rank.__getitem__)
        for i in order:
            if rank[i] != HIT:
                for b in blocks[i]:
                    if not cache.is_resident(b):
                        link.fetch(b, DEMAND_PRIORITY)
    total = policy.ctx.model.num_experts
    if policy.loads_whole_layer and total * bytes_per_expert <= cache.capacity_bytes:
        routed = set(experts)
        gathered = [[(layer, e, p) for p in range(nparts)] for e in range(total) if e not in routed]
        for expert_blocks in gathered:
            for b in expert_blocks:
                cache.pin(b)
                if not cache.is_resident(b):
                    link.fetch(b, DEMAND_PRIORITY)
        order = list(range(len(blocks), len(blocks) + len(gathered))) + order
        blocks.extend(gathered)
    apply_plan(plan, policy, num_layers, link_of_layer)
    return blocks, order
