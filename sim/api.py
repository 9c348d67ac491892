"""Run the simulator from Python: simulate(SimConfig(...)) -> RunResult. No Hydra involved."""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import pandas as pd

from policies import Policy, make_policy
from policies.registry import policy_class
from sim.budget import parse_budget
from sim.config import DEFAULT_TRAIN_FRACTION, SimConfig
from sim.engine import Simulation
from sim.fast.engine import FastPathDeclined, FastSimulation, fast_kind, tables_for
from sim.errors import ConfigError
from sim.layer_protocol import HostObserver
from sim.metrics import RunMetrics, summarize
from sim.placement import slides
from sim.profiles import HardwareProfile, load_hardware
from sim.replay import RunState, SimOptions
from traces import ModelSpec, Trace
from traces.shared import shared_trace
from traces.defaults import resolve_trace
from traces.stats import trace_reuse
from traces.model_spec import load_model_spec


ENGINES = ("auto", "simpy", "fast")


@dataclass
class RunResult:
    metrics: RunMetrics
    per_request: pd.DataFrame
    per_layer: pd.DataFrame
    config: dict[str, Any]
    wall_s: float
    token_latencies_s: list[float] = field(default_factory=list)  # every TPOT sample, in order


def resolve_model(trace: Trace, model: str | dict[str, Any] | None) -> ModelSpec:
    """The trace's model, or a profile of the same routing shape (real sizes for a stand-in trace).
    A dict without a name changes the trace's model (e.g. {"expert_format": "bf16"}); None values
    keep the model's own setting (Hydra's `model.expert_format: null`)."""
    if isinstance(model, dict):
        model = {k: v for k, v in model.items() if v is not None}
        if "name" not in model:
            return ModelSpec.from_dict({**trace.model.to_dict(), **model})
    if model is None:
        return trace.model
    spec = ModelSpec.from_dict(dict(model)) if isinstance(model, dict) else load_model_spec(model)
    if not spec.same_routing_shape(trace.model):
        t = trace.model
        raise ConfigError(f"model '{spec.name}' has {spec.num_layers} layers x {spec.num_experts} experts top-{spec.top_k}, "
                          f"the trace {t.num_layers} x {t.num_experts} top-{t.top_k}; pick a model of the trace's shape")
    return spec


def resolve_hardware(hardware: str | dict[str, Any] | HardwareProfile) -> HardwareProfile:
    if isinstance(hardware, HardwareProfile):
        return hardware
    return HardwareProfile.from_dict(dict(hardware)) if isinstance(hardware, dict) else load_hardware(hardware)


def split_requests(num_requests: int, train_fraction: float, max_requests: int | None) -> tuple[list[int], list[int]]:
    """Leading requests train the policy, the rest are replayed (at most max_requests of them)."""
    n_train = int(num_requests * train_fraction)
    replay = list(range(n_train, num_requests))
    if max_requests is not None:
        replay = replay[:max_requests]
    if not replay:
        raise ConfigError(f"no request left to replay ({num_requests} in the trace, {n_train} for training)")
    return list(range(n_train)), replay


def with_training_split(cfg: SimConfig) -> SimConfig:
    """cfg with train_fraction settled: as given, else DEFAULT_TRAIN_FRACTION for a policy that learns
    offline and 0 for the others (run_config.json then records the split used)."""
    if cfg.train_fraction is not None:
        return cfg
    trains = policy_class(cfg.policy).needs_training
    return replace(cfg, train_fraction=DEFAULT_TRAIN_FRACTION if trains else 0.0)


@dataclass
class PreparedRun:
    """A validated run, ready to execute: every input resolved, nothing simulated yet."""

    cfg: SimConfig
    trace: Trace
    model: ModelSpec
    hardware: HardwareProfile
    budget_bytes: int
    policy: Policy
    train: list[int]
    replay: list[int]


def prepare(cfg: SimConfig, trace: Trace | None = None) -> PreparedRun:
    """Resolve and check every input; bad ones raise a UserError before anything runs."""
    cfg = with_training_split(cfg)
    trace = trace if trace is not None else shared_trace(resolve_trace(cfg.trace))
    model = resolve_model(trace, cfg.model)
    if cfg.expert_format is not None:
        model = model.with_format(cfg.expert_format)
    budget = parse_budget(cfg.budget, model.bytes_per_expert)
    policy = make_policy(cfg.policy, **dict(cfg.policy_params))
    hardware = resolve_hardware(cfg.hardware).for_model(model.name).charging(policy.name, cfg.policy_host)
    train, replay = split_requests(trace.num_requests, cfg.train_fraction, cfg.max_requests)
    if policy.needs_training and not train:
        raise ConfigError(f"policy '{cfg.policy}' learns offline from a training split of the trace; "
                          f"set train_fraction above 0 (unset, it is {DEFAULT_TRAIN_FRACTION})")
    return PreparedRun(cfg, trace, model, hardware, budget, policy, train, replay)


def replay_options(cfg: SimConfig, bytes_per_expert: int | None = None) -> SimOptions:
    """How requests are served (arrivals, batching, GPUs, the host-RAM tier), as every engine takes it."""
    host = None if cfg.host_budget is None or bytes_per_expert is None else parse_budget(cfg.host_budget,
                                                                                          bytes_per_expert)
    return SimOptions(warm_start=cfg.warm_start, arrival=cfg.arrival, clients=cfg.clients, rate_rps=cfg.rate_rps,
                      max_batch=cfg.max_batch, gpus=cfg.gpus, placement=cfg.placement,
                      budget_scope=cfg.budget_scope, host_budget_bytes=host, seed=cfg.seed)


def execute(run: PreparedRun, on_request_done: Callable[[int], None] | None = None,
            observer: HostObserver | None = None) -> RunResult:
    """Run on the fast engine where the policy declares one and the run stays within what it models
    (engine=auto or fast), else on the SimPy engine, the reference; policy_info['engine'] says which.
    observer: told the duration of every host call (sim.layer_protocol.HostCalls); it needs engine=simpy
    (the fast engine makes the calls of the policies it runs its own way)."""
    engine = run.cfg.engine
    if engine not in ENGINES:
        raise ConfigError(f"engine '{engine}' unknown; use {', '.join(ENGINES)}")
    if observer is not None and engine != "simpy":
        raise ConfigError(f"timing the host's calls needs engine=simpy, not engine={engine}")
    declined = ""
    options = replay_options(run.cfg, run.model.bytes_per_expert)
    if engine != "simpy":
        kind, why = fast_kind(run.policy, options, run.hardware)
        if kind is None and engine == "fast":
            raise ConfigError(f"engine=fast: {why}; use engine=auto or engine=simpy")
        if kind is not None:
            started = time.perf_counter()
            try:
                fast = FastSimulation(run.trace, run.policy, run.model, run.hardware, run.budget_bytes, run.replay,
                                      options, on_request_done, tables_for(run.trace))
                fast.prepare(run.train)
                state = fast.run()
                return run_result(run, state, time.perf_counter() - started,
                                  extra_info={**run.hardware.host_time_info(run.policy.name), "engine": "fast"})
            except FastPathDeclined as reason:
                declined = str(reason)
                run = prepare(run.cfg, run.trace)  # a fresh policy: the fast engine has bound this one
    started = time.perf_counter()
    sim = Simulation(run.trace, run.policy, run.model, run.hardware, run.budget_bytes, run.replay, options,
                     on_request_done, observer)
    sim.prepare(run.train)
    state = sim.run()
    charged = run.hardware.host_time_info(run.policy.name)
    compactions, slid = slides(sim.caches)
    if compactions:  # unequal blocks slid down to join gaps (sim.placement)
        charged |= {"cache_compactions": compactions, "slid_bytes": slid}
    charged["engine"] = "simpy" + (f" (the fast engine declined: {declined})" if declined else "")
    return run_result(run, state, time.perf_counter() - started, extra_info=charged)


def run_result(run: PreparedRun, state: RunState, wall_s: float, hardware_name: str | None = None,
               extra_info: dict[str, Any] | None = None) -> RunResult:
    """Summarise a finished run of any engine (the simulator, realrun) into the same metrics."""
    cfg, trace, model, hardware = run.cfg, run.trace, run.model, run.hardware
    caches = state.caches
    metrics, per_request, per_layer = summarize(
        state.recorder, policy=cfg.policy, trace=str(trace.path), trace_origin=trace.source.label(),
        model=model.name, hardware=hardware_name or hardware.name, gpus=len(caches),
        budget_bytes=caches[0].capacity_bytes, bytes_per_expert=model.bytes_per_expert,
        high_water_bytes=max(c.high_water_bytes for c in caches), evictions=sum(c.evictions for c in caches),
        wasted_prefetch_bytes=sum(c.wasted_prefetch_bytes for c in caches),
        makespan_s=state.makespan_s, seed=cfg.seed, trace_token_reuse=trace_reuse(trace),
        trace_distance_to_real=trace.meta.realism.get("distance_to_real"),
        ttft_prefill="recorded" if trace.prefill_recorded else "left out",
        policy_info={**run.policy.describe(),
                     "compute_estimated": [k for k, v in hardware.measured_for(model).items() if not v],
                     **({"train_requests": len(run.train)} if run.train else {}),
                     "expert_format": model.expert_format, "bytes_per_expert": model.bytes_per_expert,
                     **({"dequant_uncharged": model.expert_format} if hardware.dequant_uncharged(model) else {}),
                     **(extra_info or {})},
    )
    return RunResult(metrics, per_request, per_layer, cfg.to_dict(), wall_s, list(state.recorder.token_latencies))


def simulate(cfg: SimConfig, trace: Trace | None = None,
             on_request_done: Callable[[int], None] | None = None) -> RunResult:
    return execute(prepare(cfg, trace), on_request_done)
