"""The GPU work of one MoE layer at the model profile's true shapes, on random bf16 weights.

Non-expert: RMSNorm, fused QKV projection, attention of the new tokens over a KV cache of
`kv_tokens` (grouped-query, as the model has it), output projection, RMSNorm, router GEMM with
softmax and top-k, and the shared experts where the model has them. Expert: a SwiGLU FFN read
straight from the bytes of its cache slot (gate and up fused: [2f, h], then down: [h, f]), the
layout transformers' fused experts use. Timing, not numerics, is the point: routing is forced.

gpt-oss (ARCHITECTURES): query heads of head_dim 64 (64 x 64 = 4096 against hidden 2880), every
other layer (the even ones, as its config's layer_types) attending to the last 128 tokens only,
each head with a learned attention sink (a logit in the softmax's denominator, no value), and a
router with a bias; experts with biases (gate_up [2f, h] with its [2f] bias, down [h, f] with its
[h] bias, in the slot in that order), gate and up interleaved, and the clamped SwiGLU of its
reference code: gate clamped above at 7, up to [-7, 7], (up + 1) * gate * sigmoid(1.702 gate).
realrun's experts are bf16 (REALRUN_FORMAT): a model shipped quantised runs at bf16 size.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from realrun.memory import random_bf16
from traces import ModelSpec

L2_SPILL_BYTES = 256 << 20  # well beyond any GPU's L2 cache (H100: 50 MB)
REALRUN_FORMAT = "bf16"  # the experts' format realrun's kernels read (random bf16 weights)


@dataclass(frozen=True)
class Architecture:
    """What a model's layers compute beyond its ModelSpec's shapes."""

    sliding_window: int = 0  # tokens the sliding layers attend to (0: every layer attends to all)
    sinks: bool = False  # a learned attention-sink logit per head
    router_bias: bool = False
    swiglu_alpha: float = 0.0  # the clamped SwiGLU of biased experts (expert_fn)
    swiglu_limit: float = 0.0

    def sliding(self, layer: int) -> bool:
        """gpt-oss's layer_types: sliding_attention on even layers, full_attention on odd ones."""
        return self.sliding_window > 0 and layer % 2 == 0


MIXTRAL_LIKE = Architecture()
GPT_OSS = Architecture(sliding_window=128, sinks=True, router_bias=True, swiglu_alpha=1.702, swiglu_limit=7.0)
ARCHITECTURES = {"gpt-oss": GPT_OSS}  # by model-name prefix; every other model: MIXTRAL_LIKE


def architecture(model: ModelSpec) -> Architecture:
    for prefix, arch in ARCHITECTURES.items():
        if model.name.startswith(prefix):
            return arch
    return MIXTRAL_LIKE


def realrun_model(model: ModelSpec) -> ModelSpec:
    """The model as realrun runs it: experts in REALRUN_FORMAT (gpt-oss's MXFP4 experts at bf16 size)."""
    return model.with_format(REALRUN_FORMAT)


def copies_beyond_cache(nbytes: int) -> int:
    """How many copies of `nbytes` of weights to cycle through so that none is still in the L2
    cache when it is read again (as in a real model, whose layers each read their own weights)."""
    return max(2, min(16, -(-L2_SPILL_BYTES // max(1, nbytes))))


def swiglu(x: torch.Tensor, weights: torch.Tensor, hidden: int) -> torch.Tensor:
    """x [tokens, hidden] through an expert whose bf16 weights are `weights` (flat: [2f, h] then [h, f])."""
    width = weights.numel() // (3 * hidden)
    gate_up = weights[: 2 * width * hidden].view(2 * width, hidden)
    down = weights[2 * width * hidden: 3 * width * hidden].view(hidden, width)
    gate, up = (x @ gate_up.t()).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ down.t()


def clamped_swiglu(x: torch.Tensor, gate_up: torch.Tensor, gate_up_bias: torch.Tensor, down: torch.Tensor,
                   down_bias: torch.Tensor, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """gpt-oss's expert on its tensors: gate_up [2f, h] (gate and up interleaved) with bias [2f],
    down [h, f] with bias [h]; gate clamped above at `limit`, up to [-limit, limit]."""
    projected = torch.addmm(gate_up_bias, x, gate_up.t())
    gate, up = projected[..., ::2].clamp(max=limit), projected[..., 1::2].clamp(-limit, limit)
    return torch.addmm(down_bias, (up + 1) * (gate * torch.sigmoid(gate * alpha)), down.t())


def biased_clamped_swiglu(x: torch.Tensor, weights: torch.Tensor, hidden: int, alpha: float,
                          limit: float) -> torch.Tensor:
    """gpt-oss's expert from one slot: flat bf16 weights [2f, h], bias [2f], [h, f], bias [h]; f from
    the slot's size, so that a part of an expert (MoEpic's segments) is an expert of its width."""
    width = (weights.numel() - hidden) // (3 * hidden + 2)
    n = 2 * width * hidden
    gate_up, gate_up_bias = weights[:n].view(2 * width, hidden), weights[n: n + 2 * width]
    n += 2 * width
    down = weights[n: n + hidden * width].view(hidden, width)
    down_bias = weights[n + hidden * width: n + hidden * width + hidden]
    return clamped_swiglu(x, gate_up, gate_up_bias, down, down_bias, alpha, limit)


ExpertFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def expert_fn(model: ModelSpec) -> ExpertFn:
    """f(x, weights): the model's expert FFN over the bf16 weights of one expert (its slot's bytes)."""
    if model.expert_bias:  # gpt-oss is the one model with biased experts: its clamped SwiGLU
        return partial(biased_clamped_swiglu, hidden=model.hidden_size,
                       alpha=GPT_OSS.swiglu_alpha, limit=GPT_OSS.swiglu_limit)
    return partial(swiglu, hidden=model.hidden_size)


def expert_weights(slot: torch.Tensor) -> torch.Tensor:
    """A cache slot's bytes as the bf16 weights of (a part of) an expert."""
    return slot[: slot.numel() // 2 * 2].view(torch.bfloat16)


class NonExpertLayer:
    def __init__(self, model: ModelSpec, device: torch.device, kv_tokens: int, generator: torch.Generator,
                 layer: int = 0):
        """`layer`: its index in the model (gpt-oss alternates sliding-window and full attention)."""
        h = model.hidden_size
        arch = architecture(model)
        self.hidden = h
        self.heads = model.num_attention_heads
        self.kv_heads = model.num_key_value_heads
        self.head_dim = model.head_dim or h // self.heads
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.top_k = model.top_k

        def param(*shape: int) -> torch.Tensor:
            numel = 1
            for s in shape:
                numel *= s
            return random_bf16(generator, numel).view(*shape).to(device)

        self.input_norm = torch.ones(h, dtype=torch.bfloat16, device=device)
        self.post_norm = torch.ones(h, dtype=torch.bfloat16, device=device)
        self.qkv = param(q + 2 * kv, h)
        self.out = param(h, q)
        self.router = param(model.num_experts, h)
        self.router_bias = param(model.num_experts) if arch.router_bias else None
        window = min(kv_tokens, arch.sliding_window) if arch.sliding(layer) else kv_tokens
        self.keys = param(1, self.kv_heads, window, self.head_dim)
        self.values = param(1, self.kv_heads, window, self.head_dim)
        self.sinks = param(self.heads).float() if arch.sinks else None
        shared = model.num_shared_experts * model.shared_expert_intermediate_size
        self.shared = param(3 * shared * h) if shared else None

    def attention(self, q: torch.Tensor) -> torch.Tensor:
        """q [1, heads, tokens, d] over the cached keys and values -> [1, heads, tokens, d]."""
        if self.sinks is None:
            return F.scaled_dot_product_attention(q, self.keys, self.values, enable_gqa=self.heads != self.kv_heads)
        # With sinks (gpt-oss's eager attention): each head's sink logit joins the softmax, then is dropped.
        _, heads, tokens, d = q.shape
        group = heads // self.kv_heads
        grouped = q.reshape(self.kv_heads, group * tokens, d)  # head i reads KV head i // group
        scores = (grouped @ self.keys[0].transpose(1, 2)).float().view(heads, tokens, -1) * d ** -0.5
        sinks = self.sinks.view(heads, 1, 1).expand(heads, tokens, 1)
        probs = torch.softmax(torch.cat([scores, sinks], dim=-1), dim=-1)[..., :-1].to(q.dtype)
        return (probs.view(self.kv_heads, group * tokens, -1) @ self.values[0]).view(1, heads, tokens, d)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [tokens, hidden] -> (residual stream after attention, normalised input of the experts)."""
        tokens, h = x.shape
        d, q_dim, kv = self.head_dim, self.heads * self.head_dim, self.kv_heads * self.head_dim
        y = F.rms_norm(x, (h,), self.input_norm)
        q = (y @ self.qkv.t()).split([q_dim, kv, kv], dim=-1)[0]  # new keys, values: timing only
        q = q.view(1, tokens, self.heads, d).transpose(1, 2)
        attn = self.attention(q)
        x = x + attn.transpose(1, 2).reshape(tokens, q_dim) @ self.out.t()
        y = F.rms_norm(x, (h,), self.post_norm)
        logits = y @ self.router.t() if self.router_bias is None else torch.addmm(self.router_bias, y, self.router.t())
        torch.topk(torch.softmax(logits.float(), dim=-1), self.top_k, dim=-1)
        if self.shared is not None:
            x = x + swiglu(y, self.shared, h)
        return x, y
