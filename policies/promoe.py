"""ProMoE (Song et al. 2024): a learned next-layer predictor, chunked preemptible copies, reordered compute.

A two-layer MLP per layer l reads what is known once layer l's router has run and predicts the
experts layer l + stride will select. Its inputs are whichever of these the trace has: the
projection of the hidden state entering layer l (hidden_proj), the router probabilities at l, and
the gates of layer l + stride applied to this hidden state (lookahead; the stand-in the paper's
replay uses when hidden states are missing). It is trained offline on the training split (fit) and
judged on the replayed requests: precision and recall of its top-`width` guesses against the
experts layer l + stride then selects are reported. Predicted experts are prefetched at low
priority; demand copies come first and preempt a prefetch between its `chunks` pieces; a layer
computes its resident experts first, then those in flight, then the missing ones. Cache: per-layer
LRU that spares predicted experts until their layer has run.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from policies.base import Block, PolicyContext, PrefetchPlan, Step, known_probs, layer_known_probs
from policies.lru import LRU
from policies.registry import register
from traces import Trace
from traces.errors import UserError


class LayerMLPs:
    """One small ReLU MLP per layer, trained together (stacked weights) with Adam on a sigmoid loss."""

    def __init__(self, layers: int, inputs: int, hidden: int, outputs: int, rng: np.random.Generator):
        self.w1 = (rng.standard_normal((layers, inputs, hidden)) * np.sqrt(2.0 / inputs)).astype(np.float32)
        self.b1 = np.zeros((layers, 1, hidden), dtype=np.float32)
        self.w2 = (rng.standard_normal((layers, hidden, outputs)) * np.sqrt(1.0 / hidden)).astype(np.float32)
        self.b2 = np.zeros((layers, 1, outputs), dtype=np.float32)
        self.mean = np.zeros((layers, 1, inputs), dtype=np.float32)
        self.std = np.ones((layers, 1, inputs), dtype=np.float32)

    def params(self) -> list[np.ndarray]:
        return [self.w1, self.b1, self.w2, self.b2]

    def fit(self, x: np.ndarray, y: np.ndarray, steps: int, batch: int, rng: np.random.Generator,
            lr: float = 1e-2) -> None:
        """x [layers, n, inputs], y [layers, n, outputs] in {0, 1}."""
        self.mean = x.mean(axis=1, keepdims=True)
        self.std = x.std(axis=1, keepdims=True) + 1e-6
        x = (x - self.mean) / self.std
        moments = [(np.zeros_like(p), np.zeros_like(p)) for p in self.params()]
        for t in range(1, steps + 1):
            idx = rng.integers(0, x.shape[1], size=min(batch, x.shape[1]))
            xb, yb = x[:, idx], y[:, idx]
            h = np.maximum(xb @ self.w1 + self.b1, 0.0)
            logits = h @ self.w2 + self.b2
            grad_logits = (1.0 / (1.0 + np.exp(-logits)) - yb) / len(idx)
            grad_h = (grad_logits @ self.w2.transpose(0, 2, 1)) * (h > 0)
            grads = [xb.transpose(0, 2, 1) @ grad_h, grad_h.sum(axis=1, keepdims=True),
                     h.transpose(0, 2, 1) @ grad_logits, grad_logits.sum(axis=1, keepdims=True)]
            for param, grad, (m, v) in zip(self.params(), grads, moments):
                m *= 0.9
                m += 0.1 * grad
                v *= 0.999
                v += 0.001 * grad * grad
                param -= lr * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)

    def scores(self, layer: int, x: np.ndarray) -> np.ndarray:
        """Logits [tokens, outputs] of one layer's MLP."""
        x = (x - self.mean[layer]) / self.std[layer]
        return np.maximum(x @ self.w1[layer] + self.b1[layer], 0.0) @ self.w2[layer] + self.b2[layer]


@register("promoe")
class ProMoE(LRU):
    compute_order = "availability"
    needs_training = True

    def __init__(self, stride: int = 1, width: int | None = None, chunks: int = 4, hidden_units: int = 32,
                 train_steps: int = 150, max_samples: int = 8192):
        if stride < 1 or chunks < 1 or hidden_units < 1:
            raise ValueError(f"stride ({stride}), chunks ({chunks}) and hidden_units ({hidden_units}) must be at least 1")
        super().__init__("per_layer")
        self.stride, self.width, self.copy_chunks = stride, width, chunks
        self.hidden_units, self.train_steps, self.max_samples = hidden_units, train_steps, max_samples
        self.predictor: LayerMLPs | None = None
        self._use_gates = False
        self.inputs: list[str] = []
        self.judged = {"true_positives": 0, "predicted": 0, "actual": 0}

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        self.width = self.width or ctx.model.top_k
        self._protected: set[Block] = set()
        self._pending: dict[int, set[int]] = {}

    # --- the predictor ---
    def _features(self, hidden: np.ndarray | None, probs: np.ndarray, gates: np.ndarray | None) -> np.ndarray:
        parts = [probs] + [a for a in (hidden, gates) if a is not None]
        return np.concatenate(parts, axis=-1).astype(np.float32)

    def fit(self, trace: Trace, requests: list[int]) -> None:
        """Train on every per-token iteration of the training split: layer l's inputs -> l+stride's experts."""
        model = trace.model
        targets = model.num_layers - self.stride
        if targets < 1:
            return  # no layer lies `stride` ahead of another: nothing to predict
        rows = np.concatenate([np.arange(o, o + p + d) for o, p, d in (trace.rows(r) for r in requests)]
                              or [np.zeros(0, dtype=np.int64)])
        if len(rows) == 0:
            raise UserError("promoe: the training split has no iterations; raise train_fraction")
        rng = self.ctx.rng
        if len(rows) > self.max_samples:
            rows = np.sort(rng.choice(rows, self.max_samples, replace=False))
        hidden = trace.hidden_proj
        use_gates = trace.lookahead is not None and trace.lookahead.shape[2] >= self.stride
        self.inputs = ["router probabilities"] + ["hidden state"] * (hidden is not None) + \
            [f"layer l+{self.stride} gates on this hidden state"] * use_gates
        probs = known_probs(trace.probs(rows))  # [n, layers, experts]; unknown ones estimated, not 0
        x = np.stack([self._features(None if hidden is None else np.asarray(hidden[rows, l], dtype=np.float32),
                                     probs[:, l],
                                     np.asarray(trace.lookahead[rows, l, self.stride - 1], dtype=np.float32)
                                     if use_gates else None) for l in range(targets)])
        y = np.zeros((targets, len(rows), model.num_experts), dtype=np.float32)
        chosen = np.asarray(trace.experts[rows], dtype=np.intp)  # [n, layers, k]
        for l in range(targets):
            np.put_along_axis(y[l], chosen[:, l + self.stride], 1.0, axis=1)
        self.predictor = LayerMLPs(targets, x.shape[2], self.hidden_units, model.num_experts, rng)
        self.predictor.fit(x, y, self.train_steps, 256, rng)
        self._use_gates = use_gates

    def _predict(self, step: Step, layer: int, probs: np.ndarray) -> set[int]:
        hidden = step.hidden(layer) if step.hidden is not None else None
        gates = step.lookahead(layer)[:, self.stride - 1] if self._use_gates and step.lookahead is not None else None
        scores = self.predictor.scores(layer, self._features(hidden, layer_known_probs(step, layer, probs), gates))
        top = np.argsort(-scores, axis=1, kind="stable")[:, : self.width]
        return {int(e) for e in top.ravel()}  # a prefill needs the union of its tokens' experts

    # --- the replay ---
    def on_step_start(self, step: Step) -> None:
        self._pending.clear()

    def on_layer_start(self, step: Step, layer: int, probs: np.ndarray, experts: tuple[int, ...]) -> PrefetchPlan | None:
        super().on_layer_start(step, layer, probs, experts)
        self._protected.difference_update((layer, e, 0) for e in range(self.ctx.model.num_experts))
        predicted = self._pending.pop(layer, None)
        if predicted is not None:
            judged = self.judged
            judged["true_positives"] += len(predicted.intersection(experts))
            judged["predicted"] += len(predicted)
            judged["actual"] += len(experts)
        target = layer + self.stride
        if target >= self.ctx.model.num_layers or self.predictor is None:
            return None
        guess = self._pending[target] = self._predict(step, layer, probs)
        blocks = [(target, e, 0) for e in sorted(guess)]
        self._protected.update(blocks)
        return PrefetchPlan([(b, 1.0) for b in blocks])

    def victim_order(self, blocks: Iterable[Block]) -> list[Block]:
        blocks = list(blocks)
        protected = self._protected
        return [b for b in blocks if b not in protected] + [b for b in blocks if b in protected]

    def describe(self) -> dict:
        j = self.judged
        return {**super().describe(), "stride": self.stride, "width": self.width, "chunks": self.copy_chunks,
                "predictor_inputs": self.inputs,
                "predictor_precision": j["true_positives"] / j["predicted"] if j["predicted"] else float("nan"),
                "predictor_recall": j["true_positives"] / j["actual"] if j["actual"] else float("nan")}
