"""No policy but the oracles reads the future: altering a trace's later iterations must leave every
decision taken before them unchanged."""
import numpy as np
import pytest

from conftest import tiny_model, unit_hardware
from policies import available, policy_class
from sim.api import execute, prepare
from sim.config import SimConfig


def decisions(trace, name):
    """Every plan and victim choice of a run, each tagged with the pass it was taken in."""
    run = prepare(SimConfig(policy=name, budget="5experts", hardware=unit_hardware(copy_s=0.3).to_dict(),
                            train_fraction=0.5, engine="simpy"), trace=trace)  # hooks observed: the reference
    policy, log, now = run.policy, [], [-1]

    def plans(hook):
        original = getattr(policy, hook)

        def logged(*args):
            if hook == "on_step_start":
                now[0] = args[0].index
            plan = original(*args)
            log.append((now[0], hook, None if plan is None else (plan.replace, [(b, round(p, 9)) for b, p in plan.blocks], plan.cpu)))
            return plan
        setattr(policy, hook, logged)

    for hook in ("on_request_start", "on_step_start", "on_layer_start"):
        plans(hook)
    choose = policy.choose_victims

    def victims(incoming, need_bytes, cache):
        chosen = choose(incoming, need_bytes, cache)
        log.append((now[0], "victims", incoming, None if chosen is None else list(chosen)))
        return chosen
    policy.choose_victims = victims
    execute(run)
    return log


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    """Four requests with prefill and embeddings; the second trace differs from the 9th pass of the
    last request on (each request: one prefill pass, then decode passes)."""
    from conftest import write_trace
    from traces import load_trace
    rng = np.random.default_rng(5)
    model = tiny_model(layers=3, experts=6, top_k=2)

    def routing():
        return [list(rng.choice(6, 2, replace=False)) for _ in range(3)]

    requests = [[routing() for _ in range(14)] for _ in range(4)]
    altered = [list(r) for r in requests]
    altered[3] = requests[3][:12] + [[[5, 4]] * 3, [[0, 1]] * 3]
    embeddings = [rng.normal(size=4) for _ in range(4)]
    base = tmp_path_factory.mktemp("future")
    kwargs = {"prefill": [4] * 4, "embeddings": embeddings}
    return (load_trace(write_trace(base / "a", model, requests, **kwargs)),
            load_trace(write_trace(base / "b", model, altered, **kwargs)))


# request 3 (the 2nd replayed) starts at pass 11 with its prefill; its decode row 12 is pass 12 + (12 - 4)
FIRST_ALTERED_PASS = 11 + 1 + 12 - 4


@pytest.mark.parametrize("name", available())
def test_decisions_before_an_altered_future_do_not_change(traces, name):
    before = [entry for entry in decisions(traces[0], name) if entry[0] < FIRST_ALTERED_PASS]
    after = [entry for entry in decisions(traces[1], name) if entry[0] < FIRST_ALTERED_PASS]
    if policy_class(name).reads_future and name != "all_resident":
        assert before != after, f"{name} reads the future, yet its decisions did not change: the test has no teeth"
    else:
        assert before == after, f"{name} changed a decision before the altered iterations: it reads the future"
