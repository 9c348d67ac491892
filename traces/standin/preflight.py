"""What traces.standin.train needs, checked before it starts: a GPU unless the CPU is asked for, and
memory for the activations the backward pass keeps (the largest part at these model widths)."""
from __future__ import annotations

from traces.resources import require_gpu, require_memory
from traces.standin.shapes import get_shape

FLOAT_BYTES = 4  # activations in float32 on the CPU (bfloat16 autocast on a GPU halves them)
PER_LAYER_HIDDEN = 48  # tensors of the hidden width kept per token and layer: attention, norms, residuals, router
PER_EXPERT_WIDTH = 4  # per token, chosen expert and layer: gate, up, activation, product
PER_VOCAB = 3  # per token: logits, their softmax and its gradient


def activation_bytes(cfg, vocab_size: int) -> float:
    """A coarse estimate of one step's activations: batch_tokens x (layers x per-token width + vocab)."""
    shape = get_shape(cfg.shape)
    width = cfg.hidden * PER_LAYER_HIDDEN + shape.top_k * PER_EXPERT_WIDTH * cfg.hidden * shape.expert_ratio
    return cfg.batch_tokens * (shape.layers * width + PER_VOCAB * vocab_size) * FLOAT_BYTES


def check_train(cfg, vocab_size: int, available: int | None = None) -> None:
    """One line, before any work: no GPU where one is meant (device auto or cuda), or, on the CPU,
    more memory than the machine has."""
    require_gpu("traces.standin.train", cfg.device, "pass --device cpu to train on the CPU anyway (slow: small "
                "batch_tokens, hidden and steps)")
    if cfg.device == "cpu":
        require_memory(f"traces.standin.train ({cfg.shape}, hidden {cfg.hidden}, batch_tokens {cfg.batch_tokens}) "
                       "on the CPU", activation_bytes(cfg, vocab_size), "lower batch_tokens, or train on a GPU",
                       available)
