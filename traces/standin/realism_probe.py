"""Held-out loss and routing realism of a model, teacher-forced on held-out conversations.

This is how ../shared/docs/routing-realism.md measured its small models: each held-out sequence's
tokens are routed in one forward pass, each token's top-k experts per layer become one iteration of
a decode-only trace, and traces.stats gives that trace's realism figures (token reuse, per-layer
LRU/Belady hit rates, distance to the real Mixtral sample where the shape matches).
"""
from __future__ import annotations

import math
import tempfile
from typing import Any

import numpy as np

from traces.collect.collector import model_spec
from traces.format import Provenance, TraceWriter, load_trace


def routed_forward(model, input_ids, autocast_dtype):
    """(logits, router probabilities [layers, batch, seq, experts]) of one teacher-forced pass."""
    import torch

    with torch.autocast(input_ids.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        out = model(input_ids=input_ids, output_router_logits=True, use_cache=False)
    batch, seq = input_ids.shape
    probs = torch.stack([logits.float().softmax(-1).view(batch, seq, -1) for logits in out.router_logits])
    return out.logits, probs


def probe(model, sequences: np.ndarray, autocast_dtype, name: str, batch: int = 16) -> dict[str, Any]:
    """heldout_loss (nats per token), heldout_perplexity and the realism figures of `sequences` [n, length]."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum, predicted, routing = 0.0, 0, []
    with torch.no_grad():
        for start in range(0, len(sequences), batch):
            ids = torch.as_tensor(sequences[start:start + batch].astype(np.int64), device=device)
            logits, probs = routed_forward(model, ids, autocast_dtype)
            loss_sum += F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
            predicted += ids[:, 1:].numel()
            routing.append(probs.permute(1, 2, 0, 3).cpu().numpy())  # [batch, seq, layers, experts]
    model.train(was_training)
    routing = np.concatenate(routing)
    spec = model_spec(name, model.config, routing.shape[2])
    source = Provenance(model=name, weights_origin="model in training", dataset="held-out ShareGPT (teacher-forced)",
                        tool="traces.standin.realism_probe")
    with tempfile.TemporaryDirectory() as tmp:
        writer = TraceWriter(f"{tmp}/probe", spec, source)
        for i, probs in enumerate(routing):
            writer.add_request(request_id=f"heldout-{i}", dataset="sharegpt-heldout", probs=probs)
        realism = load_trace(writer.close()).meta.realism
    loss = loss_sum / predicted
    return {"heldout_loss": loss, "heldout_perplexity": math.exp(loss), "realism": realism}


def flat_figures(result: dict[str, Any]) -> dict[str, float | None]:
    """One row of a log: loss, perplexity and the headline realism figures, flat."""
    realism = result["realism"]
    row = {"heldout_loss_nats": result["heldout_loss"], "heldout_perplexity": result["heldout_perplexity"],
           "token_reuse": realism.get("token_reuse"), "request_entropy_bits": realism.get("request_entropy_bits")}
    for key in ("lru_hit_rate", "belady_hit_rate"):
        row.update({f"{key}_{slots}slots": rate for slots, rate in realism.get(key, {}).items()})
    row["distance_to_real"] = realism.get("distance_to_real")
    return row
