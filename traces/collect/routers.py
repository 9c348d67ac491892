"""Capture routing from the router modules of a transformers (>= 5) MoE model, with forward hooks.

In transformers 5 every supported MoE block holds a router module (`gate` or `router`, beside its
`experts`) that returns (router_logits, top-k weights, top-k expert ids), and the block runs exactly
those experts. A hook on each router records, for every token of a forward pass and every MoE layer:
- the full probability vector: the router's own logits through the architecture's scoring function
  (softmax; sigmoid scores, as DeepSeek-V3 uses, are normalised to sum to 1);
- the experts the block ran: the router's own top-k ids, ordered by probability;
- lookahead: the routers of the next `lookahead` MoE layers applied to this layer's router input
  (what a speculative prefetcher sees); NaN where no such layer exists;
- optionally, that router input through a fixed random projection (features for learned predictors).
Nothing is recomputed from weights: probabilities come from the logits the router returned.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from traces.errors import UserError

ROUTER_NAMES = ("gate", "router")
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


@dataclass(frozen=True)
class RouterScoring:
    function: str  # "softmax" | "sigmoid": router logits -> probabilities
    selection: str  # how the router picks its experts, for the trace's provenance


TOP_K = RouterScoring("softmax", "top-k of the router probabilities")
BIASED_GROUPS = RouterScoring("sigmoid", "top-k of sigmoid scores plus a per-expert bias, within the top expert "
                                         "groups: the experts run can differ from top-k of the recorded probabilities")
ARCHITECTURES: dict[str, RouterScoring] = {
    "mixtral": TOP_K,
    "qwen2_moe": TOP_K,
    "qwen3_moe": TOP_K,
    "olmoe": TOP_K,
    "phimoe": RouterScoring("softmax", "sparsemixer: top-k of the logits (the same experts as top-k of the "
                                       "probabilities); its expert weights are not the softmax"),
    "deepseek_v2": RouterScoring("softmax", "top-k of the router probabilities, greedy or within the top expert "
                                            "groups (config topk_method)"),
    "deepseek_v3": BIASED_GROUPS,
    "glm4_moe": BIASED_GROUPS,
    "granitemoe": TOP_K,
    "gpt_oss": TOP_K,
}


def supported_architectures() -> str:
    return ", ".join(sorted(ARCHITECTURES))


def check_architecture(config) -> RouterScoring:
    """The scoring of a supported MoE config; an unsupported one gets an error naming what is missing."""
    model_type = getattr(config, "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    if not any(getattr(config, key, None) for key in EXPERT_COUNT_KEYS):
        raise UserError(f"model type '{model_type}' has no routed experts (its config has none of "
                        f"{', '.join(EXPERT_COUNT_KEYS)}); the collector records MoE routing of: {supported_architectures()}")
    raise UserError(f"model type '{model_type}' is an MoE this collector does not know: it needs the router's scoring "
                    f"function (softmax or sigmoid) in traces/collect/routers.py ARCHITECTURES; "
                    f"supported: {supported_architectures()}")


@dataclass(frozen=True)
class Router:
    name: str  # module path, e.g. model.layers.3.mlp.gate
    decoder_layer: int
    module: nn.Module


def find_routers(model: nn.Module) -> list[Router]:
    """Every MoE layer's router, in layer order: a `gate`/`router` module beside an `experts` module."""
    modules = dict(model.named_modules())
    routers = []
    for name, module in modules.items():
        parent, _, attr = name.rpartition(".")
        if attr in ROUTER_NAMES and isinstance(getattr(modules.get(parent), "experts", None), nn.Module):
            layer = re.search(r"layers\.(\d+)\.", name)
            routers.append(Router(name, int(layer.group(1)) if layer else len(routers), module))
    if not routers:
        import transformers

        raise UserError(f"found no router module ('gate' or 'router' beside 'experts') in {type(model).__name__}; "
                        f"the collector reads the MoE blocks of transformers >= 5 (installed: {transformers.__version__})")
    return routers


def score(logits: torch.Tensor, function: str) -> torch.Tensor:
    logits = logits.float()
    if function == "softmax":
        return logits.softmax(dim=-1)
    scores = logits.sigmoid()
    return scores / scores.sum(dim=-1, keepdim=True)


def hidden_projection(hidden_size: int, dim: int, seed: int) -> np.ndarray:
    """The fixed Gaussian projection [hidden_size, dim] of router inputs; reproducible from (hidden_size, dim, seed)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((hidden_size, dim)) / np.sqrt(dim)).astype(np.float32)


@dataclass(frozen=True)
class PassRouting:
    """One forward pass's routing, token-major on the CPU (tokens in the order the model flattened them)."""

    probs: np.ndarray  # float32 [tokens, layers, experts]
    experts: np.ndarray  # int64 [tokens, layers, top_k], most probable first
    lookahead: np.ndarray | None  # float32 [tokens, layers, distance, experts]
    hidden_proj: np.ndarray | None  # float32 [tokens, layers, dim]


class RouterTap:
    """Forward hooks on a model's routers (find_routers); take() returns and clears what one forward pass recorded."""

    def __init__(self, routers: list[Router], scoring: RouterScoring, num_experts: int, top_k: int, *,
                 lookahead: int = 0, projection: np.ndarray | None = None):
        self.routers = routers
        self.scoring = scoring
        self.num_experts = num_experts
        self.top_k = top_k
        self.lookahead = lookahead
        device = next(routers[0].module.parameters()).device
        self.projection = None if projection is None else torch.from_numpy(projection).to(device)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._nested = False
        self._reset()

    def _reset(self) -> None:
        n = len(self.routers)
        self._probs: list[torch.Tensor | None] = [None] * n
        self._experts: list[torch.Tensor | None] = [None] * n
        self._lookahead: list[torch.Tensor | None] = [None] * n
        self._hidden: list[torch.Tensor | None] = [None] * n

    def __enter__(self) -> RouterTap:
        for index, router in enumerate(self.routers):
            self._handles.append(router.module.register_forward_hook(self._hook(index), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._reset()

    def _unpack(self, index: int, output) -> tuple[torch.Tensor, torch.Tensor]:
        name = self.routers[index].name
        if not (isinstance(output, tuple) and len(output) >= 3 and torch.is_tensor(output[0]) and torch.is_tensor(output[2])):
            raise UserError(f"router {name} returned {type(output).__name__}, not (logits, weights, expert ids); "
                            "the collector needs the MoE routers of transformers >= 5")
        logits, chosen = output[0], output[2]
        if logits.shape[-1] != self.num_experts or chosen.shape[-1] != self.top_k or chosen.is_floating_point():
            raise UserError(f"router {name} returned logits of width {logits.shape[-1]} and expert ids of width "
                            f"{chosen.shape[-1]}; the model's config says {self.num_experts} experts, top-{self.top_k}")
        return logits.reshape(-1, self.num_experts), chosen.reshape(-1, self.top_k)

    def _hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            if self._nested:
                return
            if self._probs[index] is not None:
                raise UserError(f"router {self.routers[index].name} ran twice in one forward pass; "
                                "the collector expects one router call per MoE layer and pass")
            logits, chosen = self._unpack(index, output)
            self._probs[index] = score(logits, self.scoring.function)
            self._experts[index] = chosen
            hidden = args[0] if args else kwargs["hidden_states"]
            hidden = hidden.reshape(-1, hidden.shape[-1])
            if self.lookahead:
                self._lookahead[index] = self._look_ahead(index, hidden)
            if self.projection is not None:
                self._hidden[index] = hidden.float() @ self.projection
        return hook

    def _look_ahead(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        ahead = torch.full((hidden.shape[0], self.lookahead, self.num_experts), float("nan"), device=hidden.device)
        self._nested = True  # the next routers' own hooks must not record this call
        try:
            for distance in range(1, self.lookahead + 1):
                if index + distance < len(self.routers):
                    logits, _ = self._unpack(index + distance, self.routers[index + distance].module(hidden))
                    ahead[:, distance - 1] = score(logits, self.scoring.function)
        finally:
            self._nested = False
        return ahead

    def take(self) -> PassRouting:
        missing = [self.routers[i].name for i, p in enumerate(self._probs) if p is None]
        if missing:
            raise UserError(f"routers {missing[:3]} did not run in this forward pass; "
                            "the collector expects every MoE layer's router once per pass")
        probs = torch.stack(self._probs, dim=1).cpu().numpy()  # type: ignore[arg-type]
        experts = torch.stack(self._experts, dim=1).cpu().numpy().astype(np.int64)  # type: ignore[arg-type]
        # Most probable first, as traces order experts; the set is exactly what the router chose.
        order = np.argsort(-np.take_along_axis(probs, experts, axis=-1), axis=-1, kind="stable")
        experts = np.take_along_axis(experts, order, axis=-1)
        lookahead = torch.stack(self._lookahead, dim=1).cpu().numpy() if self.lookahead else None  # type: ignore[arg-type]
        hidden = torch.stack(self._hidden, dim=1).cpu().numpy() if self.projection is not None else None  # type: ignore[arg-type]
        self._reset()
        return PassRouting(probs, experts, lookahead, hidden)
