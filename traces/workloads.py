"""Request lengths of real workloads (prompt and output tokens), shipped with the package."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from traces.defaults import DATA_DIR
from traces.errors import UserError

WORKLOADS_DIR = DATA_DIR / "workloads"


def known_workloads() -> list[str]:
    return sorted(p.name.removesuffix("_lengths.csv") for p in WORKLOADS_DIR.glob("*_lengths.csv"))


def load_lengths(name_or_file: str | Path) -> pd.DataFrame:
    """A workload's (prompt_tokens, output_tokens) table: 'sharegpt', 'lmsys', or a CSV with those columns."""
    path = WORKLOADS_DIR / f"{name_or_file}_lengths.csv"
    if not path.is_file():
        path = Path(name_or_file)
    if not path.is_file():
        raise UserError(f"unknown workload '{name_or_file}'; known: {', '.join(known_workloads())}, "
                        "or a CSV file with prompt_tokens and output_tokens columns")
    table = pd.read_csv(path)
    if not {"prompt_tokens", "output_tokens"} <= set(table.columns):
        raise UserError(f"{path}: needs prompt_tokens and output_tokens columns")
    return table[["prompt_tokens", "output_tokens"]].astype(int)


def sample_lengths(name_or_file: str | Path, n: int, seed: int, max_prompt: int | None = None,
                   max_output: int | None = None) -> list[tuple[int, int]]:
    """n (prompt, output) pairs drawn with replacement, optionally capped (long tails cost time)."""
    table = load_lengths(name_or_file)
    rows = table.iloc[np.random.default_rng(seed).integers(len(table), size=n)]
    prompt = rows["prompt_tokens"].to_numpy()
    output = rows["output_tokens"].to_numpy().clip(min=1)
    if max_prompt is not None:
        prompt = prompt.clip(max=max_prompt)
    if max_output is not None:
        output = output.clip(max=max_output)
    return list(zip(prompt.tolist(), output.tolist()))
