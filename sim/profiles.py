"""Hardware profiles: links and compute times, as data in conf/hardware/NAME.yaml.

Copy time is a fixed latency plus bytes over bandwidth, or, where the profile has one, a measured
curve of copy time by size (realrun.calibrate writes it); compute comes from measured tables
(tokens -> seconds) per expert shape and per model's non-expert layer, interpolated piecewise
linearly. Shapes missing from the tables fall back to a roofline estimate (weight bytes over
memory bandwidth, or FLOPs over the matrix rate, plus kernel launches), and the report says so.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from conf import CONF_DIR
from sim.errors import ConfigError
from traces.model_spec import ModelSpec

# Kernels in one non-expert layer (norms, qkv, rope, attention, output, router, top-k) and in one
# expert FFN (gate/up, activation, down): what the roofline fallback charges as launch cost.
NON_EXPERT_KERNELS = 8
EXPERT_KERNELS = 3


def _number(value: Any, where: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected a number, got {value!r}") from None


@dataclass(frozen=True)
class TimeTable:
    """Seconds by token count (or by bytes, for copies), piecewise linear; linear extrapolation past
    the last point."""

    tokens: tuple[float, ...]
    seconds: tuple[float, ...]

    @classmethod
    def from_points(cls, points: Any, where: str, unit: str = "tokens") -> TimeTable:
        if isinstance(points, dict):
            points = list(points.items())
        try:
            pairs = sorted((_number(t, where), _number(s, where)) for t, s in points)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected [[{unit}, seconds], ...]") from None
        if not pairs or any(t <= 0 or s < 0 for t, s in pairs):
            raise ConfigError(f"{where}: needs at least one [{unit} > 0, seconds >= 0] point")
        return cls(tuple(t for t, _ in pairs), tuple(s for _, s in pairs))

    def __call__(self, tokens: float) -> float:
        xs, ys = self.tokens, self.seconds
        if len(xs) == 1 or tokens <= xs[0]:
            return ys[0]
        i = min(bisect.bisect_left(xs, tokens), len(xs) - 1)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return max(0.0, y0 + (y1 - y0) * (tokens - x0) / (x1 - x0))

    def to_points(self) -> list[list[float]]:
        return [[t, s] for t, s in zip(self.tokens, self.seconds)]


@dataclass(frozen=True)
class LinkSpec:
    """A copy costs latency_s + bytes / bandwidth_Bps; where a measured curve (bytes -> seconds,
    realrun.calibrate) covers the size, the curve is interpolated instead: small copies pay more
    than a fixed latency says."""

    latency_s: float
    bandwidth_Bps: float
    measured: TimeTable | None = None

    def copy_time(self, nbytes: float) -> float:
        measured = self.measured
        if measured is not None and nbytes >= measured.tokens[0]:
            return measured(nbytes)
        return self.latency_s + nbytes / self.bandwidth_Bps

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> LinkSpec:
        curve = data.get("copy_time_s")
        return cls(_number(data["latency_s"], f"{where}.latency_s"),
                   _number(data["bandwidth_Bps"], f"{where}.bandwidth_Bps"),
                   None if not curve else TimeTable.from_points(curve, f"{where}.copy_time_s", unit="bytes"))

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"latency_s": self.latency_s, "bandwidth_Bps": self.bandwidth_Bps}
        if self.measured is not None:
            data["copy_time_s"] = self.measured.to_points()
        return data


@dataclass(frozen=True)
class AfterWaitSpec:
    """Work that starts right after the GPU has waited (for a copy, say) runs slower, and recovers
    as work goes on. Measured on an H100 (realrun.calibrate): the kernel launches of the executor's
    first layers after a copy wait take up to ~2.5x as long, more the longer the wait; the GPU's SM
    clock stays at its maximum meanwhile (NVML), so this is the launch path waking up, not clocks.

    A first-order model with one state, warmth in [0, 1] per GPU: waiting cools it with time
    constant cool_down_s, work warms it with time constant warm_up_s, and work that starts at
    warmth w takes 1 + (cold_factor - 1) * (1 - w) times its (warm) table time."""

    cold_factor: float
    warm_up_s: float
    cool_down_s: float

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> AfterWaitSpec:
        spec = cls(*(_number(data[k], f"{where}.{k}") for k in ("cold_factor", "warm_up_s", "cool_down_s")))
        if spec.cold_factor < 1.0 or spec.warm_up_s <= 0 or spec.cool_down_s <= 0:
            raise ConfigError(f"{where}: needs cold_factor >= 1 and positive warm_up_s, cool_down_s")
        return spec

    def to_dict(self) -> dict[str, Any]:
        return {"cold_factor": self.cold_factor, "warm_up_s": self.warm_up_s, "cool_down_s": self.cool_down_s}

    def step(self, warmth, waited_s, seconds):
        """(wall time, warmth after) of `seconds` of warm work that starts after waiting `waited_s`
        at `warmth`. Works on floats and, element-wise, on numpy arrays (calibrate fits with it)."""
        warmth = warmth * math.e ** (-waited_s / self.cool_down_s)
        wall = seconds * (1.0 + (self.cold_factor - 1.0) * (1.0 - warmth))
        return wall, 1.0 - (1.0 - warmth) * math.e ** (-wall / self.warm_up_s)


@dataclass(frozen=True)
class PolicyHostTime:
    """The host's time inside a policy's decisions, on the critical path: the GPU has finished
    the router (on_layer_start) or the token (on_step_start/end) and waits for the host to decide
    and launch (realrun measures ~0.1 ms per layer for the matching policies, as much as a decode
    layer's compute). Copies already started go on meanwhile."""

    layer_s: float  # per on_layer_start
    step_s: float  # per pass: on_step_start plus on_step_end
    # per chunk that lands: the host commits it, hears the policy, and picks the next copy's victims
    # (the policy's ranking) before that copy can start; beyond lru's (the copies' own baseline)
    land_s: float = 0.0
    # Not this policy's own measurement: the measured policy whose times it is charged (a profile's
    # `NAME: {same_as: OTHER}`, or policy_host=OTHER), or "zero" (policy_host=zero); None: its own.
    stand_in: str | None = None
    # Measured at several budgets: rows (share of all experts the cache holds, layer_s, step_s,
    # land_s), by share; a run is charged the times interpolated at its own share (at()). A policy
    # that ranks every resident expert at each copy takes longer the more the cache holds: on
    # gpt-oss-20b, oracle_prefetch's landings cost 2.9x as much at half of the experts as at an eighth (H200 host).
    by_budget: tuple[tuple[float, float, float, float], ...] = ()

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> PolicyHostTime:
        try:
            rows = tuple(tuple(_number(v, f"{where}.by_budget") for v in row) for row in data.get("by_budget") or ())
            spec = cls(_number(data["layer_s"], f"{where}.layer_s"), _number(data["step_s"], f"{where}.step_s"),
                       _number(data.get("land_s", 0.0), f"{where}.land_s"),
                       None if data.get("same_as") is None else str(data["same_as"]), tuple(sorted(rows)))
        except (KeyError, TypeError, AttributeError):
            raise ConfigError(f"{where}: expected {{layer_s: seconds, step_s: seconds[, land_s: seconds][, by_budget: "
                              "[[share, layer_s, step_s, land_s], ...]]} or {same_as: POLICY}") from None
        if any(len(row) != 4 or not 0 < row[0] <= 1 for row in spec.by_budget):
            raise ConfigError(f"{where}.by_budget: each row is [share of the experts (0..1], layer_s, step_s, land_s]")
        if min((spec.layer_s, spec.step_s, spec.land_s, *(v for row in spec.by_budget for v in row[1:]))) < 0:
            raise ConfigError(f"{where}: host times must be >= 0")
        return spec

    def to_dict(self) -> dict[str, Any]:
        times = {"layer_s": self.layer_s, "step_s": self.step_s, **({"land_s": self.land_s} if self.land_s else {}),
                 **({"by_budget": [list(row) for row in self.by_budget]} if self.by_budget else {})}
        return times if self.stand_in is None else {**times, "same_as": self.stand_in}

    @property
    def charges_landings(self) -> bool:
        return bool(self.land_s or any(row[3] for row in self.by_budget))

    def at(self, share: float) -> PolicyHostTime:
        """The times charged a run whose caches hold `share` of all experts: interpolated linearly
        between the measured budgets, the nearest one's outside them; these times without rows."""
        rows = self.by_budget
        if not rows:
            return self
        if share <= rows[0][0] or len(rows) == 1:
            times = rows[0][1:]
        elif share >= rows[-1][0]:
            times = rows[-1][1:]
        else:
            hi = next(i for i, row in enumerate(rows) if row[0] >= share)
            (a, *lo_t), (b, *hi_t) = rows[hi - 1], rows[hi]
            w = (share - a) / (b - a)
            times = tuple(x + w * (y - x) for x, y in zip(lo_t, hi_t))
        return PolicyHostTime(*times, stand_in=self.stand_in)


@dataclass(frozen=True)
class ModelTerms:
    """One model's after_wait and policy_host_s on a profile calibrated on several models."""

    after_wait: AfterWaitSpec | None = None
    policy_host_s: dict[str, PolicyHostTime] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> ModelTerms:
        if not isinstance(data, dict) or not set(data) <= {"after_wait", "policy_host_s"}:
            raise ConfigError(f"{where}: expected {{after_wait: ..., policy_host_s: ...}} (either may be left out)")
        return cls(AfterWaitSpec.from_dict(data["after_wait"], f"{where}.after_wait") if data.get("after_wait") else None,
                   _policy_host(data.get("policy_host_s") or {}, f"{where}.policy_host_s"))

    def to_dict(self) -> dict[str, Any]:
        return {**({"after_wait": self.after_wait.to_dict()} if self.after_wait is not None else {}),
                **({"policy_host_s": {k: v.to_dict() for k, v in self.policy_host_s.items()}}
                   if self.policy_host_s else {})}


def _policy_host(data: dict[str, Any], where: str) -> dict[str, PolicyHostTime]:
    """A profile's policy_host_s: measured times, and `NAME: {same_as: OTHER}` entries that charge a
    policy not measured on this machine OTHER's measured times (labelled so in every result)."""
    def alias(value: Any) -> str | None:
        return str(value["same_as"]) if isinstance(value, dict) and set(value) == {"same_as"} else None

    times = {k: PolicyHostTime.from_dict(v, f"{where}.{k}") for k, v in data.items() if alias(v) is None}
    for k, v in data.items():
        other = alias(v)
        if other is None:
            continue
        if other not in times or times[other].stand_in is not None:
            raise ConfigError(f"{where}.{k}: same_as '{other}' is not a policy this profile measured; "
                              f"measured: {', '.join(sorted(n for n, t in times.items() if t.stand_in is None))}")
        times[k] = replace(times[other], stand_in=other)
    return dict(sorted(times.items()))


NO_HOST_TIME = PolicyHostTime(0.0, 0.0)


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    description: str
    origin: str
    gpu_memory_bytes: float
    host_link: LinkSpec
    mem_bandwidth_Bps: float
    matmul_flops: float
    launch_s: float
    expert_time_s: dict[str, TimeTable] = field(default_factory=dict)
    non_expert_layer_time_s: dict[str, TimeTable] = field(default_factory=dict)
    num_gpus: int = 1
    # NVLink between GPU pairs (one copy at a time per direction and pair); None: no NVLink.
    nvlink: LinkSpec | None = None
    nvlink_pairs: tuple[tuple[int, int], ...] = ()
    # The host side's limit on all host->GPU copies together (root complex, CPU memory); None: no limit.
    host_aggregate_Bps: float | None = None
    after_wait: AfterWaitSpec | None = None  # None: compute always takes its table time
    # Per registered policy name (measured by realrun.calibrate); empty: an estimated profile, whose
    # policies decide in no time; else a policy not listed is an error (policy_host_time).
    policy_host_s: dict[str, PolicyHostTime] = field(default_factory=dict)
    cpu: Any = None  # sim.host_cpu.CpuSpec: the host CPU as a compute resource; None: no CPU compute
    disk: Any = None  # sim.disk.DiskSpec: the NVMe drive under host memory; None: no disk tier
    # Seconds to dequantise one expert's weights before its matmul, per stored format (bf16 needs none);
    # a format not listed is charged nothing, and the report says so (dequant_uncharged).
    dequant_s_per_expert: dict[str, float] = field(default_factory=dict)
    # Per model name, the terms a calibration measures per model but that are not keyed by shape
    # (after_wait, policy_host_s): a machine calibrated on several models keeps each one's own; a
    # model not listed takes the top-level terms (for_model).
    per_model: dict[str, ModelTerms] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HardwareProfile:
        name = data.get("name", "?")
        where = f"hardware '{name}'"
        try:
            return cls(
                name=str(name),
                description=str(data.get("description", "")),
                origin=str(data.get("origin", "")),
                gpu_memory_bytes=_number(data["gpu_memory_bytes"], f"{where}.gpu_memory_bytes"),
                host_link=LinkSpec.from_dict(data["host_link"], f"{where}.host_link"),
                mem_bandwidth_Bps=_number(data["mem_bandwidth_Bps"], f"{where}.mem_bandwidth_Bps"),
                matmul_flops=_number(data["matmul_flops"], f"{where}.matmul_flops"),
                launch_s=_number(data.get("launch_s", 0.0), f"{where}.launch_s"),
                expert_time_s={k: TimeTable.from_points(v, f"{where}.expert_time_s.{k}")
                               for k, v in (data.get("expert_time_s") or {}).items()},
                non_expert_layer_time_s={k: TimeTable.from_points(v, f"{where}.non_expert_layer_time_s.{k}")
                                         for k, v in (data.get("non_expert_layer_time_s") or {}).items()},
                num_gpus=int(data.get("num_gpus", 1)),
                nvlink=_link(data.get("nvlink"), f"{where}.nvlink"),
                nvlink_pairs=tuple(tuple(int(g) for g in pair) for pair in (data.get("nvlink") or {}).get("pairs", [])),
                host_aggregate_Bps=None if data.get("host_aggregate_Bps") is None
                else _number(data["host_aggregate_Bps"], f"{where}.host_aggregate_Bps"),
                after_wait=AfterWaitSpec.from_dict(data["after_wait"], f"{where}.after_wait")
                if data.get("after_wait") else None,
                policy_host_s=_policy_host(data.get("policy_host_s") or {}, f"{where}.policy_host_s"),
                cpu=_cpu(data.get("cpu"), f"{where}.cpu"),
                disk=_disk(data.get("disk"), f"{where}.disk"),
                dequant_s_per_expert={str(k): _number(v, f"{where}.dequant_s_per_expert.{k}")
                                      for k, v in (data.get("dequant_s_per_expert") or {}).items()},
                per_model={str(k): ModelTerms.from_dict(v, f"{where}.per_model.{k}")
                           for k, v in (data.get("per_model") or {}).items()},
                extra={k: v for k, v in data.items() if k not in _FIELDS},
            )
        except KeyError as exc:
            raise ConfigError(f"{where}: missing field {exc}; see conf/hardware/h100.yaml for the layout") from None

    def to_dict(self) -> dict[str, Any]:
        nvlink = None if self.nvlink is None else {
            **self.nvlink.to_dict(), "pairs": [list(pair) for pair in self.nvlink_pairs]}
        return {
            "num_gpus": self.num_gpus, "nvlink": nvlink, "host_aggregate_Bps": self.host_aggregate_Bps,
            "name": self.name, "description": self.description, "origin": self.origin,
            "gpu_memory_bytes": self.gpu_memory_bytes,
            "host_link": self.host_link.to_dict(),
            "mem_bandwidth_Bps": self.mem_bandwidth_Bps, "matmul_flops": self.matmul_flops, "launch_s": self.launch_s,
            "expert_time_s": {k: v.to_points() for k, v in self.expert_time_s.items()},
            "non_expert_layer_time_s": {k: v.to_points() for k, v in self.non_expert_layer_time_s.items()},
            **({"after_wait": self.after_wait.to_dict()} if self.after_wait is not None else {}),
            **({"policy_host_s": {k: v.to_dict() for k, v in self.policy_host_s.items()}} if self.policy_host_s else {}),
            **({"cpu": self.cpu.to_dict()} if self.cpu is not None else {}),
            **({"disk": self.disk.to_dict()} if self.disk is not None else {}),
            **({"dequant_s_per_expert": dict(self.dequant_s_per_expert)} if self.dequant_s_per_expert else {}),
            **({"per_model": {k: v.to_dict() for k, v in self.per_model.items()}} if self.per_model else {}),
            **self.extra,
        }

    def expert_time(self, model: ModelSpec, tokens: float) -> float:
        """One expert's compute; the roofline reads the weights in their stored format. A quantised
        format adds its dequantisation where this profile knows it (dequant_s_per_expert)."""
        dequant = self.dequant_s_per_expert.get(model.expert_format, 0.0)
        table = self.expert_time_s.get(model.expert_shape_key)
        if table is not None:
            return table(tokens) + dequant
        flops = 2.0 * model.params_per_expert * tokens
        return EXPERT_KERNELS * self.launch_s + dequant + max(model.bytes_per_expert / self.mem_bandwidth_Bps,
                                                             flops / self.matmul_flops)

    def dequant_uncharged(self, model: ModelSpec) -> bool:
        """A quantised expert format whose dequantisation this profile does not know (charged 0 s)."""
        return model.expert_format != "bf16" and model.expert_format not in self.dequant_s_per_expert

    def non_expert_time(self, model: ModelSpec, tokens: float) -> float:
        table = self.non_expert_layer_time_s.get(model.name)
        if table is not None:
            return table(tokens)
        params = model.non_expert_params_per_layer
        return NON_EXPERT_KERNELS * self.launch_s + max(params * model.bytes_per_param / self.mem_bandwidth_Bps,
                                                        2.0 * params * tokens / self.matmul_flops)

    def for_model(self, model: str) -> HardwareProfile:
        """This profile as a run of `model` sees it: that model's own after_wait and policy_host_s where
        the profile measured them (per_model), else the top-level ones; per_model then empty, so that
        the profile a run records is the one it was charged."""
        terms = self.per_model.get(model)
        if terms is None:
            return replace(self, per_model={}) if self.per_model else self
        return replace(self, after_wait=terms.after_wait if terms.after_wait is not None else self.after_wait,
                       policy_host_s=terms.policy_host_s or self.policy_host_s, per_model={})

    def policy_host_time(self, policy: str) -> PolicyHostTime:
        """The host time `policy`'s decisions are charged: the measured one; none on a profile that
        measured no policy; an error on one that measured others but not this one."""
        if policy in self.policy_host_s:
            return self.policy_host_s[policy]
        if not self.policy_host_s:
            return NO_HOST_TIME
        raise ConfigError(f"hardware '{self.name}' has no measured host time for policy '{policy}' (it has "
                          f"{', '.join(self.measured_policies())}); measure it (python -m realrun.calibrate "
                          f"--name {self.name} --policy-trace TRACE, on that GPU) or choose what to charge: policy_host=zero, or "
                          "policy_host=POLICY for a measured policy's time")

    def measured_policies(self) -> list[str]:
        return [name for name, t in self.policy_host_s.items() if t.stand_in is None]

    def charging(self, policy: str, how: str | None) -> HardwareProfile:
        """This profile with `policy`'s host time settled (SimConfig.policy_host): None, as the profile
        has it (an error where a measured profile lacks it); "zero"; or a measured policy's times."""
        if how is None:
            self.policy_host_time(policy)
            return self
        if how == "zero":
            time = PolicyHostTime(0.0, 0.0, 0.0, "zero")
        elif how in self.measured_policies():
            time = replace(self.policy_host_s[how], stand_in=None if how == policy else how)
        else:
            raise ConfigError(f"policy_host={how}: hardware '{self.name}' measured no host time for '{how}'; use "
                              f"zero or one of: {', '.join(self.measured_policies()) or '(none measured)'}")
        return replace(self, policy_host_s={**self.policy_host_s, policy: time})

    def host_time_info(self, policy: str) -> dict[str, Any]:
        """What a result says about the host time charged to `policy`'s decisions (policy_info)."""
        time = self.policy_host_time(policy)
        if not self.policy_host_s:
            return {"policy_host_uncharged": f"hardware '{self.name}' measured no policy's host time"}
        if time.stand_in == "zero":
            return {"policy_host_uncharged": "policy_host=zero"}
        charged = time.stand_in is not None or time.layer_s or time.step_s or time.charges_landings
        return {"policy_host_s": time.to_dict()} if charged else {}

    def measured_for(self, model: ModelSpec) -> dict[str, bool]:
        """Whether this profile has measured tables for the model, or estimates them."""
        return {"expert_time": model.expert_shape_key in self.expert_time_s,
                "non_expert_time": model.name in self.non_expert_layer_time_s}


_FIELDS = {"name", "description", "origin", "gpu_memory_bytes", "host_link", "mem_bandwidth_Bps", "matmul_flops",
           "launch_s", "expert_time_s", "non_expert_layer_time_s", "num_gpus", "nvlink", "host_aggregate_Bps",
           "after_wait", "policy_host_s", "cpu", "disk", "dequant_s_per_expert", "per_model"}


def _link(data: dict[str, Any] | None, where: str) -> LinkSpec | None:
    return LinkSpec.from_dict(data, where) if data else None


def _cpu(data: dict[str, Any] | None, where: str):
    from sim.host_cpu import CpuSpec  # host_cpu builds on this module's tables
    return CpuSpec.from_dict(data, where) if data else None


def _disk(data: dict[str, Any] | None, where: str):
    from sim.disk import DiskSpec
    return DiskSpec.from_dict(data, where) if data else None


def known_hardware() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "hardware").glob("*.yaml"))


def load_hardware(name_or_path: str | Path) -> HardwareProfile:
    """A hardware profile by name (conf/hardware/NAME.yaml) or by path to such a YAML file."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = CONF_DIR / "hardware" / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown hardware '{name_or_path}'; known profiles: {', '.join(known_hardware())}")
    return HardwareProfile.from_dict(yaml.safe_load(path.read_text()))
