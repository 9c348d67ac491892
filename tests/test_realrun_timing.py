"""realrun's timing instruments: the per-kernel-group timeline, the clock log, repeated
measurements in compare, and waiting asleep on copies; on the CPU, where decisions still must
equal the simulator's."""
import pandas as pd
import pytest
import yaml

from conftest import tiny_model, unit_hardware

pytest.importorskip("torch")  # realrun runs on torch; the core install has none
from realrun.api import execute_real
from realrun.backend import Backend
from realrun import calibrate as calibrate_module
from realrun.calibrate import after_wait_response, fit_after_wait
from realrun.compare import TIMELINE, StoredRuns, run_compare
from realrun.executor import Machine, RealOptions, Timeline
from realrun.gpu_clocks import ClockLog, mean_clock
from sim.api import execute, prepare
from sim.config import SimConfig
from traces.errors import UserError

DECISIONS = ["hits", "prefetch_hits", "late_prefetches", "misses", "bytes_h2d"]


@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    """Three layers of four experts, top-2; a request with a 3-token prefill and a decode-only one."""
    import numpy as np

    from conftest import write_trace
    from traces import load_trace

    rng = np.random.default_rng(11)
    requests = [[[list(rng.choice(4, 2, replace=False)) for _ in range(3)] for _ in range(n)] for n in (8, 6)]
    return load_trace(write_trace(tmp_path_factory.mktemp("t") / "trace", tiny_model(layers=3, experts=4, top_k=2),
                                  requests, prefill=[3, 0]))


def config(trace, **cfg):
    return SimConfig(trace=str(trace.path), hardware=unit_hardware().to_dict(), **cfg)


def test_timeline_records_every_kernel_group_and_wait_and_changes_no_decision(routed):
    machine = Machine(routed.model, RealOptions(device="cpu", kv_tokens=8))
    timeline = Timeline()
    real = execute_real(prepare(config(routed, policy="lru", budget="2experts"), routed), machine, timeline=timeline)
    sim = execute(prepare(config(routed, policy="lru", budget="2experts"), routed))
    pd.testing.assert_frame_equal(sim.per_layer[DECISIONS], real.per_layer[DECISIONS])
    frame = timeline.frame()
    kinds = frame["kind"].value_counts()
    assert kinds["non_expert"] == real.metrics.steps * routed.model.num_layers
    assert kinds["expert"] == real.metrics.expert_uses  # one launch group per expert a pass uses
    assert kinds["stall"] == real.per_layer["misses"].sum()  # demand-only: every miss is waited for
    assert kinds["land"] == real.per_layer["misses"].sum()  # ... and each copy's one chunk lands once
    # the host's own work between them: the policy's decision and the copies queued, every layer
    assert kinds["policy"] == kinds["start_layer"] == kinds["non_expert"]
    assert (frame["host_end_s"] >= frame["host_s"]).all() and frame["step"].is_monotonic_increasing
    assert frame["gpu_start_s"].isna().all()  # no GPU events on the CPU


@pytest.mark.parametrize("policy", ["lru", "oracle_prefetch"])
def test_sleeping_on_copies_decides_as_the_simulator(routed, policy):
    machine = Machine(routed.model, RealOptions(device="cpu", kv_tokens=8, copy_wait="sleep"))
    real = execute_real(prepare(config(routed, policy=policy, budget="3experts"), routed), machine)
    sim = execute(prepare(config(routed, policy=policy, budget="3experts"), routed))
    pd.testing.assert_frame_equal(sim.per_layer[DECISIONS], real.per_layer[DECISIONS])
    with pytest.raises(UserError, match="copy_wait=doze"):
        Machine(routed.model, RealOptions(device="cpu", kv_tokens=8, copy_wait="doze"))


def test_compare_repeats_compares_the_median_run_and_rejoins_it(routed, tmp_path):
    profile = tmp_path / "unit.yaml"
    profile.write_text(yaml.safe_dump(unit_hardware().to_dict()))
    machine = Machine(routed.model, RealOptions(device="cpu", kv_tokens=8))
    table = run_compare(routed, ["lru"], ["2experts", "3experts"], str(profile), machine, tmp_path / "out",
                        timeline=True, repeats=3)
    runs = pd.read_csv(tmp_path / "out" / "runs.csv").query("engine == 'real'")
    assert len(runs) == 2 * 3 and runs.groupby("budget")["chosen"].sum().eq(1).all()
    for budget, measured in runs.groupby("budget"):
        chosen = measured[measured["chosen"]]["tpot_mean_s"].iloc[0]
        assert chosen == sorted(measured["tpot_mean_s"])[1]  # the median of three
        row = table[table["budget"] == budget].iloc[0]
        assert row["tpot_mean_s_real"] == chosen
        spread = (measured["tpot_mean_s"].max() - measured["tpot_mean_s"].min()) / chosen
        assert row["tpot_mean_real_spread"] == pytest.approx(spread)
    timeline = pd.read_csv(tmp_path / "out" / TIMELINE)
    assert sorted(timeline["repeat"].unique()) == [0, 1, 2]
    text = (tmp_path / "out" / "compare.md").read_text()
    assert "(spread " in text and "Where the error lies" in text
    again = run_compare(routed, ["lru"], ["2experts", "3experts"], str(profile), None, tmp_path / "again",
                        stored=StoredRuns(tmp_path / "out"))
    pd.testing.assert_frame_equal(table, again)
    layers = pd.read_csv(tmp_path / "out" / "layers.csv").query("engine == 'real'")
    assert sorted(layers["repeat"].unique()) == [0, 1, 2]  # every repeat's tables are kept
    # Measurements of two sessions pool: the median of all five runs is compared.
    run_compare(routed, ["lru"], ["2experts", "3experts"], str(profile), machine, tmp_path / "more", repeats=2)
    pooled = run_compare(routed, ["lru"], ["2experts", "3experts"], str(profile), None, tmp_path / "pooled",
                         stored=StoredRuns(tmp_path / "out", tmp_path / "more"))
    both = pd.read_csv(tmp_path / "pooled" / "runs.csv").query("engine == 'real'")
    assert len(both) == 2 * 5 and set(both["source"]) == {str(tmp_path / "out"), str(tmp_path / "more")}
    for budget, measured in both.groupby("budget"):
        assert pooled[pooled["budget"] == budget]["tpot_mean_s_real"].iloc[0] == sorted(measured["tpot_mean_s"])[2]
    with pytest.raises(UserError, match="--repeats 0"):
        run_compare(routed, ["lru"], ["2experts"], str(profile), machine, tmp_path / "none", repeats=0)


def test_clock_log_means_are_time_weighted_and_the_log_says_why_it_is_empty():
    samples = pd.DataFrame({"t_s": [0.0, 1.0, 2.0, 3.0], "sm_mhz": [300, 1000, 2000, 2000], "event_reasons": 0})
    assert mean_clock(samples, 0.5, 2.5) == pytest.approx((0.5 * 300 + 1000 + 0.5 * 2000) / 2)
    assert mean_clock(samples, 1.0, 3.0) == pytest.approx(1500)
    assert pd.isna(mean_clock(samples, -1.0, 1.0))  # before the log began
    with ClockLog(enabled=False) as log:
        pass
    assert log.unavailable == "not asked for" and log.samples.empty


def test_copy_curve_samples_every_size_in_rounds(monkeypatch):
    measured = []
    real_round = calibrate_module._CopyRig.round

    def logged(rig):
        measured.append(rig.size)
        return real_round(rig)
    monkeypatch.setattr(calibrate_module._CopyRig, "round", logged)
    sizes = [1 << 16, 1 << 18]
    points, dma, found = calibrate_module.copy_curve(Backend("cpu"), sizes, reps=12, rounds=3,
                                                     spread_limit=float("inf"))
    assert measured == sizes * 3  # round after round over all sizes, not one size's samples back to back
    assert [p[0] for p in points] == [p[0] for p in dma] == sizes and all(p[1] > 0 for p in points + dma)
    assert [len(m.values) for m in found.values()] == [3, 3]
    measured.clear()
    # Every size's rounds disagree (limit 0): both are measured again, in rounds, twice (the bound).
    _, _, found = calibrate_module.copy_curve(Backend("cpu"), sizes, reps=12, rounds=3, spread_limit=0.0)
    assert measured == sizes * 7 and [m.remeasured for m in found.values()] == [2, 2]


def test_after_wait_needs_a_gpu_and_a_cpu_calibration_models_none():
    assert after_wait_response(Backend("cpu"), tiny_model(), kv_tokens=8) == {}
    assert fit_after_wait({}) is None


def test_decode_graphs_compute_what_the_eager_kernels_do():
    import torch

    from realrun.graphs import DecodeGraphs
    from realrun.kernels import NonExpertLayer, swiglu
    from realrun.memory import random_bf16

    model = tiny_model(layers=2, experts=4, top_k=2)
    generator = torch.Generator().manual_seed(3)
    layers = {i: NonExpertLayer(model, torch.device("cpu"), 8, generator) for i in range(2)}
    weights = [random_bf16(generator, model.bytes_per_expert // 2) for _ in range(3)]
    x0 = torch.randn(1, model.hidden_size, generator=generator).to(torch.bfloat16)

    eager = x0
    for i in range(2):
        eager, y = layers[i].forward(eager)
        for w in weights[i:i + 2]:
            eager[:1] += swiglu(y[:1], w, model.hidden_size)

    graphs = DecodeGraphs(Backend("cpu"), model.hidden_size, lambda y, w: swiglu(y, w, model.hidden_size))
    graphs.capture_layers(layers)
    places = [w.view(torch.uint8) for w in weights[:2]]  # graphs for two places, the third runs eagerly
    graphs.capture_experts(places)
    graphs.x.copy_(x0)
    for i in range(2):
        graphs.non_expert(i)
        for w in weights[i:i + 2]:
            graphs.expert(w)
    assert torch.equal(graphs.x, eager)
    assert graphs.replays == 2 + 3 and graphs.eager == 1


@pytest.mark.parametrize("policy, budget, eager, gpus", [("lru", "2experts", False, 1), ("moepic", "5experts", True, 1),
                                                        ("lru", "2experts", False, 2)])
def test_graphs_decide_as_the_simulator_and_unequal_parts_run_eagerly(routed, policy, budget, eager, gpus):
    machine = Machine(routed.model, RealOptions(device="cpu", kv_tokens=8, graphs=True, gpus=gpus))
    real = execute_real(prepare(config(routed, policy=policy, budget=budget, gpus=gpus), routed), machine)
    sim = execute(prepare(config(routed, policy=policy, budget=budget, gpus=gpus), routed))
    pd.testing.assert_frame_equal(sim.per_layer[DECISIONS], real.per_layer[DECISIONS])
    decode_passes = real.metrics.steps - 1  # one prefill pass runs eagerly
    for gpu, graphs in enumerate(machine.graphs):  # every device replays its own layers' graphs
        assert graphs.replays >= decode_passes * len(machine.layers_of(gpu))
    assert (sum(g.eager for g in machine.graphs) > 0) == eager
    with pytest.raises(UserError, match="graphs=true needs realrun's own layers"):
        Machine(routed.model, RealOptions(device="cpu", kv_tokens=8, graphs=True), non_expert=False)
