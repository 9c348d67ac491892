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

    def _split(self, flat: np.ndarray) -> list[np.ndarray]:
        """flat cut into arrays shaped as the parameters (views)."""
        ends = np.cumsum([p.size for p in self.params()])[:-1]
        return [part.reshape(p.shape) for part, p in zip(np.split(flat, ends), self.params())]

    def fit(self, x: np.ndarray, y: np.ndarray, steps: int, batch: int, rng: np.random.Generator,
            lr: float = 1e-2) -> None:
        """x [n, layers, inputs], y [n, layers, outputs] in {0, 1}: samples first, so that a batch is
        gathered by rows and its sums over the batch run along whole rows of every layer at once
        (the same sequential sums as over a layer's column)."""
        mean = x.mean(axis=0, keepdims=True)
        std = x.std(axis=0, keepdims=True) + 1e-6
        self.mean, self.std = mean.transpose(1, 0, 2), std.transpose(1, 0, 2)  # [layers, 1, inputs]
        x = x - mean
        x /= std  # in place: x is the whole training split
        # The parameters become views of one buffer and the gradients are written into another
        # shaped alike, so each Adam step is one pass over every parameter (elementwise: the same
        # values as per parameter).
        flat = np.concatenate([p.ravel() for p in self.params()])
        grad = np.empty_like(flat)
        self.w1, self.b1, self.w2, self.b2 = self._split(flat)
        g_w1, g_b1, g_w2, g_b2 = self._split(grad)
        m, v = np.zeros_like(flat), np.zeros_like(flat)
        for t in range(1, steps + 1):
            idx = rng.integers(0, len(x), size=min(batch, len(x)))
            xb, yb = x[idx], y[idx]
            h, grad_logits = self._forward(xb)
            _sigmoid_loss_grad(grad_logits, yb)
            grad_h = _per_layer(grad_logits, self.w2.transpose(0, 2, 1))
            grad_h *= h > 0
            np.matmul(xb.transpose(1, 2, 0), grad_h.transpose(1, 0, 2), out=g_w1)
            np.add.reduce(grad_h, axis=0, out=g_b1[:, 0])
            np.matmul(h.transpose(1, 2, 0), grad_logits.transpose(1, 0, 2), out=g_w2)
            np.add.reduce(grad_logits, axis=0, out=g_b2[:, 0])
            _adam_step(flat, grad, m, v, t, lr)

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(hidden activations, logits) [n, layers, units] of every layer's MLP on normalised x
        [n, layers, inputs]."""
        h = _per_layer(x, self.w1)
        h += self.b1[:, 0]
        np.maximum(h, 0.0, out=h)
        logits = _per_layer(h, self.w2)
        logits += self.b2[:, 0]
        return h, logits

    def scores(self, layer: int, x: np.ndarray) -> np.ndarray:
        """Logits [tokens, outputs] of one layer's MLP."""
        x = (x - self.mean[layer]) / self.std[layer]
        return np.maximum(x @ self.w1[layer] + self.b1[layer], 0.0) @ self.w2[layer] + self.b2[layer]


def _per_layer(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x [n, layers, inputs] times each layer's w [layers, inputs, outputs]: [n, layers, outputs]."""
    out = np.empty((x.shape[0], w.shape[0], w.shape[2]), dtype=np.result_type(x, w))
    np.matmul(x.transpose(1, 0, 2), w, out=out.transpose(1, 0, 2))
    return out


def _sigmoid_loss_grad(logits: np.ndarray, y: np.ndarray) -> None:
    """logits [n, layers, outputs] replaced, in place, by the sigmoid loss's gradient
    (sigmoid(logits) - y) / n."""
    np.negative(logits, out=logits)
    np.exp(logits, out=logits)
    logits += 1.0
    np.divide(1.0, logits, out=logits)
    logits -= y
    logits /= len(y)


def _adam_step(param: np.ndarray, grad: np.ndarray, m: np.ndarray, v: np.ndarray, t: int, lr: float) -> None:
    """Adam's step t (from 1) on param, in place, with its moments m and v."""
    m *= 0.9
    m += 0.1 * grad
    v *= 0.999
    v += 0.001 * grad * grad
    param -= lr * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)


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
        # each layer's blocks, made once: a started layer unprotects all of them
        self._layer_blocks = [tuple((layer, e, 0) for e in range(ctx.model.num_experts))
                              for layer in range(ctx.model.num_layers)]
        self._pending: dict[int, set[int]] = {}

    # --- the predictor ---
    def _features(self, hidden: np.ndarray | None, probs: np.ndarray, gates: np.ndarray | None) -> np.ndarray:
        parts = [probs] + [a for a in (hidden, gates) if a is not None]
        return np.concatenate(parts, axis=-1, dtype=np.float32)

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
        layers = slice(0, targets)  # the layers that predict
        probs = known_probs(trace.probs(rows, layers))  # [n, layers, experts]; unknown ones estimated, not 0
        x = self._features(None if hidden is None else hidden[rows, layers], probs,
                           trace.lookahead[rows, layers, self.stride - 1] if use_gates else None)
        y = np.zeros((len(rows), targets, model.num_experts), dtype=np.float32)
        chosen = np.asarray(trace.experts[rows, self.stride:], dtype=np.intp)  # [n, layers, k], stride ahead
        np.put_along_axis(y, chosen, 1.0, axis=2)
        self.predictor = LayerMLPs(targets, x.shape[2], self.hidden_units, model.num_experts, rng)
        self.predictor.fit(x, y, self.train_steps, 256, rng)
        self._use_gates = use_gates

    def _predict(self, step: Step, layer: int, probs: np.ndarray) -> set[int]:
        hidden = step.hidden(layer) if step.hidden is not None else None
        gates = step.lookahead(layer)[:, self.stride - 1] if self._use_gates and step.lookahead is not None else None
        scores = self.predictor.scores(layer, self._features(hidden, layer_known_probs(step, layer, probs), gates))
        top = (-scores).argsort(axis=1, kind="stable")[:, : self.width]
        return set(top.ravel().tolist())  # a prefill needs the union of its tokens' experts

    # --- the replay ---
    def on_step_start(self, step: Step) -> None:
        self._pending.clear()

    def on_layer_start(self, step: Step, layer: int, probs: np.ndarray, experts: tuple[int, ...]) -> PrefetchPlan | None:
        super().on_layer_start(step, layer, probs, experts)
        self._protected.difference_update(self._layer_blocks[layer])
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
