"""The GPU work of one MoE layer at the model profile's true shapes, on random bf16 weights.

Non-expert: RMSNorm, fused QKV projection, attention of the new tokens over a KV cache of
`kv_tokens` (grouped-query, as the model has it), output projection, RMSNorm, router GEMM with
softmax and top-k, and the shared experts where the model has them. Expert: a SwiGLU FFN read
straight from the bytes of its cache slot (gate and up fused: [2f, h], then down: [h, f]), the
layout transformers' fused experts use. Timing, not numerics, is the point: routing is forced.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from realrun.memory import random_bf16
from traces import ModelSpec

L2_SPILL_BYTES = 256 << 20  # well beyond any GPU's L2 cache (H100: 50 MB)


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


def expert_weights(slot: torch.Tensor) -> torch.Tensor:
    """A cache slot's bytes as the bf16 weights of (a part of) an expert."""
    return slot[: slot.numel() // 2 * 2].view(torch.bfloat16)


class NonExpertLayer:
    def __init__(self, model: ModelSpec, device: torch.device, kv_tokens: int, generator: torch.Generator):
        h = model.hidden_size
        self.hidden = h
        self.heads = model.num_attention_heads
        self.kv_heads = model.num_key_value_heads
        self.head_dim = h // self.heads
        kv = self.kv_heads * self.head_dim
        self.top_k = model.top_k

        def param(*shape: int) -> torch.Tensor:
            numel = 1
            for s in shape:
                numel *= s
            return random_bf16(generator, numel).view(*shape).to(device)

        self.input_norm = torch.ones(h, dtype=torch.bfloat16, device=device)
        self.post_norm = torch.ones(h, dtype=torch.bfloat16, device=device)
        self.qkv = param(h + 2 * kv, h)
        self.out = param(h, h)
        self.router = param(model.num_experts, h)
        self.keys = param(1, self.kv_heads, kv_tokens, self.head_dim)
        self.values = param(1, self.kv_heads, kv_tokens, self.head_dim)
        shared = model.num_shared_experts * model.shared_expert_intermediate_size
        self.shared = param(3 * shared * h) if shared else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [tokens, hidden] -> (residual stream after attention, normalised input of the experts)."""
        tokens, h = x.shape
        d, kv = self.head_dim, self.kv_heads * self.head_dim
        y = F.rms_norm(x, (h,), self.input_norm)
        q, k, v = (y @ self.qkv.t()).split([h, kv, kv], dim=-1)
        q = q.view(1, tokens, self.heads, d).transpose(1, 2)
        attn = F.scaled_dot_product_attention(q, self.keys, self.values, enable_gqa=self.heads != self.kv_heads)
        x = x + attn.transpose(1, 2).reshape(tokens, h) @ self.out.t()
        y = F.rms_norm(x, (h,), self.post_norm)
        torch.topk(torch.softmax((y @ self.router.t()).float(), dim=-1), self.top_k, dim=-1)
        if self.shared is not None:
            x = x + swiglu(y, self.shared, h)
        return x, y
