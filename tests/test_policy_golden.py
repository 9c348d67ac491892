"""Golden figures of the Python policies on the SimPy engine, pinned before the engine-side speed-ups
(sim.cache's evictable table for policies.victims): hit rate, a hash of every TPOT sample, host
bytes and makespan on the default trace's first replayed request at 6 GB. A change of behaviour in
the shared code they call fails here. (A policy whose own module is rewritten gets new figures.)"""
from __future__ import annotations

import hashlib
import json

import pytest

from sim.api import simulate
from sim.config import SimConfig

GOLDEN = {
    "finemoe": [0.009235811112766274, "e09a278cc7bc639d", 6370325692416.0, 121.7114455302738],
    "moe_infinity": [0.20221957396097126, "909d91c7c8693280", 5816476237824.0, 111.16824089999125],
    "promoe": [0.00029792939073439596, "2ff719b3ba647c00", 5175955685376.0, 100.27352861805016],
    "mixtral_offload": [0.017279904662594964, "b0af795e6c0b3a8a", 5181592829952.0, 99.88865528500686],
    "moepic": [0.088038134962014, "3f2fc631b9271c13", 5644895649468.0, 110.01247307606263],
}


@pytest.mark.parametrize("policy", sorted(GOLDEN))
def test_golden(policy):
    result = simulate(SimConfig(policy=policy, budget="6GB", max_requests=1, train_fraction=0.5))
    m = result.metrics
    tpot_hash = hashlib.sha256(json.dumps(result.token_latencies_s).encode()).hexdigest()[:16]
    assert [m.hit_rate, tpot_hash, m.bytes_h2d, m.makespan_s] == GOLDEN[policy]
