"""The routing shapes of the paper's models, and transformers configs that keep them at a narrow width."""
from __future__ import annotations

from dataclasses import dataclass

from traces.collect.tiny import moe_config
from traces.errors import UserError


@dataclass(frozen=True)
class StandinShape:
    """A real model's routing topology; widths are kept as ratios to the real hidden size."""

    model: str  # the conf/model profile of the real model
    arch: str  # transformers model_type
    layers: int
    experts: int
    top_k: int
    expert_ratio: float  # expert intermediate size / hidden size
    shared_ratio: float = 0.0  # shared expert intermediate size / hidden size (0: none)

    def widths(self, hidden: int) -> tuple[int, int | None]:
        """(expert, shared expert) widths: the real ratios, rounded to multiples of 8 (grouped matmuls need
        16-byte aligned strides)."""
        def width(ratio: float) -> int:
            return max(8, 8 * round(ratio * hidden / 8))

        return width(self.expert_ratio), width(self.shared_ratio) if self.shared_ratio else None


SHAPES = {
    shape.model: shape for shape in (
        # Widths from the models' config.json (conf/model/*.yaml).
        StandinShape("mixtral-8x7b", "mixtral", layers=32, experts=8, top_k=2, expert_ratio=14336 / 4096),
        StandinShape("qwen1.5-moe", "qwen2_moe", layers=24, experts=60, top_k=4, expert_ratio=1408 / 2048,
                     shared_ratio=5632 / 2048),
        StandinShape("phi-3.5-moe", "phimoe", layers=32, experts=16, top_k=2, expert_ratio=6400 / 4096),
    )
}


def get_shape(name: str) -> StandinShape:
    if name not in SHAPES:
        raise UserError(f"shape={name} unknown; choose one of {', '.join(SHAPES)}")
    return SHAPES[name]


def standin_config(shape: StandinShape, *, hidden: int, heads: int, vocab_size: int, special: tuple[int, int, int],
                   dropout: float = 0.0):
    """The transformers config of a stand-in: the real topology, `hidden` wide, no router aux loss of its own
    (training adds its own balance loss, batch- or sequence-wise)."""
    if hidden % heads:
        raise UserError(f"heads={heads} must divide hidden={hidden}")
    expert_width, shared_width = shape.widths(hidden)
    config = moe_config(shape.arch, layers=shape.layers, hidden=hidden, heads=heads, experts=shape.experts,
                        top_k=shape.top_k, expert_width=expert_width, shared_width=shared_width,
                        vocab_size=vocab_size, special=special, attention_dropout=dropout)
    config.router_aux_loss_coef = 0.0
    return config
