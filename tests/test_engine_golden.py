"""Golden figures of every shipped policy on a fixed small trace, on both engines: the SimPy
simulator (hit rate, a hash of every TPOT sample, host bytes, makespan) and realrun's executor on
the CPU (hit rate, host bytes, misses and late prefetches per layer). Pinned before the engine core
was shared between the engines, so a refactor that changes behaviour fails here. The trace is a
synthetic stand-in (4 layers of 8 experts, top-2, 4 requests, seed 19) on conftest's unit hardware;
the realrun figures are pinned for the policies whose decisions do not depend on how long real
copies take (the others land prefetches by wall time)."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from conftest import tiny_model, unit_hardware, write_trace

from sim.api import execute, prepare
from sim.config import SimConfig

SIM = {  # policy: [hit rate, TPOT hash, bytes_h2d, makespan_s]
    "all_resident": [1.0, "98d85ff50f3cb9e8", 0.0, 9.199999999999994],
    "belady": [0.2840909090909091, "201510bc0e72080a", 96768.0, 68.60000000000004],
    "deepspeed": [0.022727272727272728, "abbfea1233fd101a", 224256.0, 146.01],
    "fiddler": [0.13636363636363635, "34b8d2e56bf788f2", 0.0, 39.316666666666684],
    "finemoe": [0.10227272727272728, "844906b654759cb3", 121344.0, 83.7],
    "ktransformers": [0.14772727272727273, "7ec8eeeac26418df", 0.0, 38.816666666666684],
    "lru": [0.13636363636363635, "6855f569381ec05b", 116736.0, 80.9],
    "lru_cpu": [0.11363636363636363, "9182507c9b1b1c03", 82944.0, 54.01],
    "mixtral_offload": [0.03409090909090909, "5618edd2a15ad3af", 148992.0, 99.84],
    "moe_infinity": [0.056818181818181816, "13f8af2594200d6c", 162816.0, 106.98],
    "moepic": [0.045454545454545456, "23357bae7981328d", 169714.0, 111.0108854166666],
    "n_cpu_moe": [0.0, "76ae7c467d682c71", 0.0, 45.316666666666684],
    "oracle_prefetch": [0.25, "6a5444aecb15a4fc", 101376.0, 66.2],
    "promoe": [0.0, "d3f2466cb46e0ec6", 147456.0, 97.40999999999997],
    "reuse": [0.11363636363636363, "5d503befbc01cf65", 121344.0, 83.69000000000003],
}
REAL = {  # policy: [hit rate, bytes_h2d, misses per layer, late prefetches per layer]
    "all_resident": [1.0, 0.0, [0, 0, 0, 0], [0, 0, 0, 0]],
    "belady": [0.2840909090909091, 96768.0, [16, 15, 16, 16], [0, 0, 0, 0]],
    "fiddler": [0.13636363636363635, 0.0, [17, 19, 18, 22], [0, 0, 0, 0]],
    "ktransformers": [0.14772727272727273, 0.0, [18, 19, 18, 20], [0, 0, 0, 0]],
    "lru": [0.13636363636363635, 116736.0, [20, 17, 17, 22], [0, 0, 0, 0]],
    "n_cpu_moe": [0.0, 0.0, [22, 22, 22, 22], [0, 0, 0, 0]],
}


@pytest.fixture(scope="module")
def golden_trace(tmp_path_factory):
    from traces import load_trace

    rng = np.random.default_rng(19)
    requests = [[[list(rng.choice(8, 2, replace=False)) for _ in range(4)] for _ in range(n)] for n in (7, 6, 5, 6)]
    path = write_trace(tmp_path_factory.mktemp("golden") / "trace", tiny_model(layers=4, experts=8, top_k=2),
                       requests, prefill=[3, 0, 2, 0])
    return load_trace(path)


def config(trace, policy: str) -> SimConfig:
    return SimConfig(trace=str(trace.path), hardware=unit_hardware().to_dict(), policy=policy, budget="5experts",
                     train_fraction=0.5)


def test_every_shipped_policy_is_pinned():
    from policies import available

    assert available() == sorted(SIM)


@pytest.mark.parametrize("policy", sorted(SIM))
def test_simulator_golden(golden_trace, policy):
    result = execute(prepare(config(golden_trace, policy), golden_trace))
    m = result.metrics
    tpot_hash = hashlib.sha256(json.dumps(result.token_latencies_s).encode()).hexdigest()[:16]
    assert [m.hit_rate, tpot_hash, m.bytes_h2d, m.makespan_s] == SIM[policy]


@pytest.fixture(scope="module")
def cpu_machine(golden_trace):
    from realrun.executor import Machine, RealOptions

    return Machine(golden_trace.model, RealOptions(device="cpu", kv_tokens=8, host_sources=5))


@pytest.mark.parametrize("policy", sorted(REAL))
def test_realrun_executor_golden(golden_trace, cpu_machine, policy):
    from realrun.api import execute_real

    result = execute_real(prepare(config(golden_trace, policy), golden_trace), cpu_machine)
    layers = result.per_layer
    assert [result.metrics.hit_rate, result.metrics.bytes_h2d, [int(v) for v in layers["misses"]],
            [int(v) for v in layers["late_prefetches"]]] == REAL[policy]
