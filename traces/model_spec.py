"""Shape of an MoE model as far as expert offloading cares."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from traces.errors import UserError
from traces.expert_formats import BIAS_BYTES, FORMATS, expert_format

GATED_FFN_MATRICES = 3  # SwiGLU experts: gate, up and down projections


@dataclass(frozen=True)
class ModelSpec:
    name: str
    num_layers: int
    num_experts: int
    top_k: int
    hidden_size: int
    expert_intermediate_size: int
    num_shared_experts: int = 0
    shared_expert_intermediate_size: int = 0
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 0  # 0: hidden_size // num_attention_heads (gpt-oss: 64 with hidden 2880 and 64 heads)
    bytes_per_param: int = 2  # bf16: activations and the non-expert weights
    expert_format: str = "bf16"  # how experts are stored (traces.expert_formats); sets bytes_per_expert
    expert_bias: bool = False  # experts carry biases (gpt-oss): 2 x width + hidden, in bf16
    # Explicit size when experts are not plain gated FFNs of the stated shape.
    bytes_per_expert_override: int | None = None

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_experts", "top_k", "hidden_size", "expert_intermediate_size"):
            if getattr(self, name) <= 0:
                raise UserError(f"model '{self.name}': {name} must be positive, got {getattr(self, name)}")
        if self.top_k > self.num_experts:
            raise UserError(f"model '{self.name}': top_k {self.top_k} exceeds num_experts {self.num_experts}")
        expert_format(self.expert_format)  # one clear error for an unknown format name

    @property
    def params_per_expert(self) -> int:
        return GATED_FFN_MATRICES * self.hidden_size * self.expert_intermediate_size

    @property
    def bias_params_per_expert(self) -> int:
        return 2 * self.expert_intermediate_size + self.hidden_size if self.expert_bias else 0

    def expert_bytes(self, fmt: str) -> int:
        """Bytes of one expert stored in format `fmt` (weights + bf16 biases)."""
        return expert_format(fmt).weight_bytes(self.params_per_expert) + self.bias_params_per_expert * BIAS_BYTES

    def expert_bytes_by_format(self) -> dict[str, int]:
        return {name: self.expert_bytes(name) for name in FORMATS}

    def with_format(self, fmt: str) -> ModelSpec:
        return replace(self, expert_format=fmt)

    @property
    def bytes_per_expert(self) -> int:
        """Bytes of one expert in the stored format: what a copy moves and a budget counts."""
        if self.bytes_per_expert_override is not None:
            return self.bytes_per_expert_override
        return self.expert_bytes(self.expert_format)

    @property
    def total_expert_bytes(self) -> int:
        return self.bytes_per_expert * self.num_layers * self.num_experts

    @property
    def expert_shape_key(self) -> str:
        """Key of the compute tables: experts of equal shape take equal time."""
        return f"h{self.hidden_size}_f{self.expert_intermediate_size}"

    @property
    def non_expert_params_per_layer(self) -> int:
        """Attention, router and shared experts: what stays on the GPU per layer."""
        head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        q, kv = self.num_attention_heads * head_dim, self.num_key_value_heads * head_dim
        attention = 2 * self.hidden_size * q + 2 * self.hidden_size * kv
        router = self.hidden_size * self.num_experts
        shared = GATED_FFN_MATRICES * self.hidden_size * self.shared_expert_intermediate_size * self.num_shared_experts
        return attention + router + shared

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise UserError(f"model spec: unknown keys {sorted(unknown)}; known keys are {sorted(known)}")
        return cls(**data)

    def same_routing_shape(self, other: ModelSpec) -> bool:
        return (self.num_layers, self.num_experts, self.top_k) == (other.num_layers, other.num_experts, other.top_k)

    @classmethod
    def from_hf_config(cls, path: str | Path, name: str | None = None) -> ModelSpec:
        """Read the shape from a transformers config.json (Mixtral, Qwen-MoE, PhiMoE, OLMoE, DeepSeek...)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            cfg = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"{path}: cannot read a transformers config ({exc}); pass a config.json or its folder") from None
        return cls.from_hf_dict(cfg, name=name or cfg.get("_name_or_path") or cfg.get("model_type", path.parent.name))

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], name: str) -> ModelSpec:
        def first(*keys: str, default: Any = None) -> Any:
            for key in keys:
                if cfg.get(key) is not None:
                    return cfg[key]
            return default

        experts = first("num_local_experts", "num_experts", "n_routed_experts")
        top_k = first("num_experts_per_tok", "experts_per_token", "moe_top_k")
        width = first("moe_intermediate_size", "expert_intermediate_size", "intermediate_size")
        missing = [n for n, v in (("number of experts", experts), ("experts per token", top_k), ("expert width", width)) if v is None]
        if missing:
            raise UserError(f"config of '{name}' is not an MoE config: missing {', '.join(missing)}")
        hidden = cfg["hidden_size"]
        shared = first("n_shared_experts", "num_shared_experts", default=0) or 0
        shared_width = first("shared_expert_intermediate_size", default=0) or 0
        if shared and not shared_width:
            shared_width = width
        if not shared and shared_width:
            # Qwen2-MoE: one fused shared expert of its own width.
            shared = 1
        heads = first("num_attention_heads", default=32)
        quant = (cfg.get("quantization_config") or {}).get("quant_method")
        return cls(
            name=str(name),
            num_layers=int(cfg["num_hidden_layers"]) - int(first("first_k_dense_replace", default=0) or 0),
            num_experts=int(experts),
            top_k=int(top_k),
            hidden_size=int(hidden),
            expert_intermediate_size=int(width),
            num_shared_experts=int(shared),
            shared_expert_intermediate_size=int(shared_width),
            num_attention_heads=int(heads),
            num_key_value_heads=int(first("num_key_value_heads", default=heads)),
            head_dim=int(first("head_dim", default=0) or 0),
            # Experts ship quantised only where the config says so (gpt-oss: mxfp4); else bf16.
            expert_format=quant if quant in FORMATS else "bf16",
            expert_bias=cfg.get("model_type") == "gpt_oss",  # gpt-oss experts have gate_up and down biases
        )


def known_models() -> list[str]:
    from conf import CONF_DIR

    return sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def load_model_spec(name_or_path: str) -> ModelSpec:
    """A model profile by name (conf/model/NAME.yaml), or a transformers config.json / its folder."""
    import yaml

    from conf import CONF_DIR

    path = Path(name_or_path)
    if path.suffix == ".json" or (path.is_dir() and (path / "config.json").is_file()):
        return ModelSpec.from_hf_config(path)
    profile = CONF_DIR / "model" / f"{name_or_path}.yaml"
    if not profile.is_file():
        raise UserError(f"unknown model '{name_or_path}'; known models: {', '.join(known_models())}, "
                        "or a path to a transformers config.json")
    return ModelSpec.from_dict(yaml.safe_load(profile.read_text()))
