"""Expert offloading policies: one module each, registered by name (see policies.base for the interface)."""
from policies.base import DEMAND_PRIORITY, Block, CacheView, Policy, PolicyContext, PrefetchPlan, RequestInfo, Step
from policies.registry import available, make_policy, policy_class, register, shipped

__all__ = [
    "DEMAND_PRIORITY", "Block", "CacheView", "Policy", "PolicyContext", "PrefetchPlan", "RequestInfo", "Step",
    "available", "make_policy", "policy_class", "register", "shipped",
]
