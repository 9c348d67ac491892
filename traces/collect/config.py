"""Settings of one collection run (plain dataclass; the CLI fills it from its flags, traces.cli.ConfigParser)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from traces.errors import UserError

EMBEDDING_SOURCES = ("minilm", "token_mean")
TURNS = ("first", "all")
# Settings that do not change what a run records: a resumed run may differ in these.
NOT_RECORDED = ("out", "overwrite", "progress")


@dataclass(frozen=True)
class CollectConfig:
    model: str  # a transformers model directory or hub id
    dataset: str = "sharegpt"  # sharegpt | sharegpt-sample | lmsys | lmsys-chat | lmsys-eval | arena-hard | FILE
    n_requests: int = 100
    out: str | None = None  # trace directory; default traces/collected/MODEL-DATASET-N
    seed: int = 0
    # Which prompts: the first user turn, or the whole conversation up to its last user turn.
    turns: str = "first"
    min_prompt_tokens: int = 4
    max_prompt_tokens: int = 1024
    # Output length: the recorded answer's length, capped here; sources without one decode this many.
    max_output_tokens: int = 256
    output_tokens: int | None = None  # the same output length for every request
    ignore_eos: bool = True  # decode the full output length, as serving benchmarks do
    temperature: float = 0.0  # 0: greedy
    batch_size: int = 8
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16
    lookahead: int = 2  # gates of the next layers applied to each layer's hidden state
    hidden_proj_dim: int = 0  # 0: no hidden-state projection
    topm: int | None = None  # store only the m most probable experts (for large expert counts)
    embeddings: str = "minilm,token_mean"  # comma-separated; the first is the default
    weights_origin: str | None = None  # default: read from the model directory or its hub id
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        positive = ("n_requests", "max_prompt_tokens", "max_output_tokens", "batch_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"{name}={getattr(self, name)} must be at least 1")
        if self.output_tokens is not None and self.output_tokens < 1:
            raise UserError(f"output_tokens={self.output_tokens} must be at least 1")
        if not 1 <= self.min_prompt_tokens <= self.max_prompt_tokens:
            raise UserError(f"min_prompt_tokens={self.min_prompt_tokens} must lie between 1 and "
                            f"max_prompt_tokens={self.max_prompt_tokens}")
        if self.turns not in TURNS:
            raise UserError(f"turns={self.turns}: choose {' or '.join(TURNS)}")
        if self.temperature < 0 or self.lookahead < 0 or self.hidden_proj_dim < 0:
            raise UserError("temperature, lookahead and hidden_proj_dim must be >= 0")
        unknown = [name for name in self.embedding_sources if name not in EMBEDDING_SOURCES]
        if unknown:
            raise UserError(f"embeddings: unknown source '{unknown[0]}'; choose from {', '.join(EMBEDDING_SOURCES)}")

    @property
    def embedding_sources(self) -> list[str]:
        return [name.strip() for name in self.embeddings.split(",") if name.strip()]

    @property
    def out_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        model = Path(self.model.rstrip("/")).name
        dataset = Path(self.dataset).stem
        return Path("traces") / "collected" / f"{model}-{dataset}-{self.n_requests}"

    def recorded_settings(self) -> dict[str, Any]:
        """The settings that decide what is recorded: a resumed run must match them."""
        return {key: value for key, value in asdict(self).items() if key not in NOT_RECORDED}
