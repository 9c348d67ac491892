"""The host CPU as a compute resource: what one expert's FFN costs there, by token count and stored
format (conf/hardware/NAME.yaml, section `cpu:`).

Measured tables (realrun.calibrate measures them on the GPU machine's host) are keyed by the
model's expert shape and format ("h4096_f14336/bf16"); a shape or format missing from them falls
back to a roofline of the host: weight bytes over host-memory bandwidth, or FLOPs over the cores'
matrix rate, plus dequantising what is stored below bf16; the report says which were estimated.
Activations cross the host link both ways (hidden state down, results up): `activation_time`.

What an expert costs on the CPU depends on what the host thread that serves the GPU does meanwhile:
blocked on the CPU's result, the FFN's worker runs at full speed (`expert_time_s`); spinning in
Python on copy events, it holds the GIL but for the interpreter's hand-overs, and on the H200 host
one bf16 Mixtral expert at 1 token took 12.7 ms beside it against 6.8 ms (`spinning_time_s`, where
measured; realrun.cpu_experts --as-run measures both). The engine charges the spinning table while
the layer's GPU side still waits for copies and the other after.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sim.errors import ConfigError
from sim.profiles import LinkSpec, TimeTable, _number
from traces.model_spec import ModelSpec

DEFAULT_FORMAT = "bf16"


@dataclass(frozen=True)
class CpuSpec:
    cores: int
    mem_bandwidth_Bps: float  # host memory, as the expert FFN streams its weights
    matmul_flops: float  # all cores together, at the format's compute type
    # GPU -> host copies of activations; None: as the host link (same PCIe, other direction)
    down_link: LinkSpec | None = None
    # Per stored format: seconds per weight byte to dequantise on the CPU (0 for bf16 and fp32)
    dequant_s_per_byte: dict[str, float] = field(default_factory=dict)
    expert_time_s: dict[str, TimeTable] = field(default_factory=dict)  # "SHAPE/FORMAT" -> tokens -> seconds
    # The same, while the host thread spins on copies beside the FFN; a key missing: as expert_time_s
    spinning_time_s: dict[str, TimeTable] = field(default_factory=dict)
    origin: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> CpuSpec:
        try:
            spec = cls(cores=int(data["cores"]),
                       mem_bandwidth_Bps=_number(data["mem_bandwidth_Bps"], f"{where}.mem_bandwidth_Bps"),
                       matmul_flops=_number(data["matmul_flops"], f"{where}.matmul_flops"),
                       down_link=LinkSpec.from_dict(data["down_link"], f"{where}.down_link")
                       if data.get("down_link") else None,
                       dequant_s_per_byte={k: _number(v, f"{where}.dequant_s_per_byte.{k}")
                                           for k, v in (data.get("dequant_s_per_byte") or {}).items()},
                       expert_time_s={k: TimeTable.from_points(v, f"{where}.expert_time_s.{k}")
                                      for k, v in (data.get("expert_time_s") or {}).items()},
                       spinning_time_s={k: TimeTable.from_points(v, f"{where}.spinning_time_s.{k}")
                                        for k, v in (data.get("spinning_time_s") or {}).items()},
                       origin=str(data.get("origin", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: needs cores, mem_bandwidth_Bps and matmul_flops ({exc}); see "
                              "conf/hardware/h200-measured.yaml's cpu section") from None
        if spec.cores < 1 or spec.mem_bandwidth_Bps <= 0 or spec.matmul_flops <= 0:
            raise ConfigError(f"{where}: cores, mem_bandwidth_Bps and matmul_flops must be positive")
        for name, tables in (("expert_time_s", spec.expert_time_s), ("spinning_time_s", spec.spinning_time_s)):
            bad = [k for k in tables if "/" not in k]
            if bad:
                raise ConfigError(f"{where}.{name}: key {bad[0]!r} should be SHAPE/FORMAT, e.g. h4096_f14336/bf16")
        return spec

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"cores": self.cores, "mem_bandwidth_Bps": self.mem_bandwidth_Bps,
                                "matmul_flops": self.matmul_flops, "origin": self.origin}
        if self.down_link is not None:
            data["down_link"] = self.down_link.to_dict()
        if self.dequant_s_per_byte:
            data["dequant_s_per_byte"] = dict(self.dequant_s_per_byte)
        data["expert_time_s"] = {k: v.to_points() for k, v in self.expert_time_s.items()}
        if self.spinning_time_s:
            data["spinning_time_s"] = {k: v.to_points() for k, v in self.spinning_time_s.items()}
        return data

    @staticmethod
    def key(model: ModelSpec, fmt: str) -> str:
        return f"{model.expert_shape_key}/{fmt}"

    def measured(self, model: ModelSpec, fmt: str = DEFAULT_FORMAT) -> bool:
        return self.key(model, fmt) in self.expert_time_s

    def expert_time(self, model: ModelSpec, tokens: float, fmt: str = DEFAULT_FORMAT,
                    stored_bytes: int | None = None, spinning: bool = False) -> float:
        """Seconds for one expert's FFN over `tokens` tokens on the host, its weights stored as `fmt`
        (`stored_bytes` per expert; None: the model's bf16 bytes); `spinning`: while the host thread
        spins on copies beside it (the module's docstring)."""
        key = self.key(model, fmt)
        table = (self.spinning_time_s.get(key) if spinning else None) or self.expert_time_s.get(key)
        if table is not None:
            return table(tokens)
        nbytes = model.bytes_per_expert if stored_bytes is None else stored_bytes
        flops = 2.0 * model.params_per_expert * tokens
        return max(nbytes / self.mem_bandwidth_Bps, flops / self.matmul_flops) \
            + nbytes * self.dequant_s_per_byte.get(fmt, 0.0)


def activation_time(spec: CpuSpec, host_link: LinkSpec, nbytes: float) -> tuple[float, float]:
    """(down, up) seconds to move `nbytes` of activations GPU -> host and host -> GPU."""
    down = (spec.down_link or host_link).copy_time(nbytes)
    return down, host_link.copy_time(nbytes)
