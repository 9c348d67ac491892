"""A generative model of MoE routing, fitted to a trace by maximum likelihood.

Each layer l routes each iteration t by Gumbel-top-k sampling (exactly a Plackett-Luce ranking) of
the logits

    z[t, l, e] = intercept[l, e]                                popularity
               + recency[l, 0] * [e chosen at t-1, layer l]      token-to-token stickiness
               + sum_j recency[l, 1 + j] * h_j[t, l, e]          drift: h_j = decayed history of e's choices
               + sum_{e' chosen at t, layer l-1} cross[l, e', e] transition across layers
               + offset[request, l, e]                           the request's own (and its topic's) bias

the history h_j[t] = decay_j * h_j[t-1] + (1 - decay_j) * [e chosen at t-1] starting at 0 with each
request. Given the recorded history the model is a conditional logit, so each layer's fit is a
convex problem (ridge-penalised negative log-likelihood of the recorded ordered top-k, L-BFGS).
Sampling runs the same recursion forward. Offsets are drawn per request: fit_request_spread picks
their spread so that generated requests differ from one another as much as the recorded ones do.
The top-k weights written with the experts are softmax(temperature[l] * perturbed logits) over the
chosen k; the temperature matches the mean log ratio of consecutive top-k weights of the fitted trace.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import minimize

from traces.stats import choice_mask, popularity_divergence


@dataclass(frozen=True)
class Regularization:
    """Ridge penalties (per unit of squared weight) on the three parameter groups; chosen by
    held-out likelihood on the real Mixtral sample (fit on one sequence, score the other)."""

    intercept: float = 10.0
    recency: float = 1.0
    cross_layer: float = 10.0


DEFAULT_DECAYS = (0.9,)


@dataclass
class RoutingModel:
    num_layers: int
    num_experts: int
    top_k: int
    decays: tuple[float, ...]
    intercept: np.ndarray  # [layers, experts]
    recency: np.ndarray  # [layers, 1 + len(decays)]
    cross_layer: np.ndarray  # [layers, experts (layer l-1's), experts (layer l's)]; layer 0's unused
    temperature: np.ndarray  # [layers]
    regularization: Regularization = field(default_factory=Regularization)
    fitted_iterations: int = 0

    def describe(self) -> dict[str, Any]:
        """Hyper-parameters and headline weights, for a trace's provenance."""
        return {
            "decays": list(self.decays), "regularization": asdict(self.regularization),
            "fitted_iterations": self.fitted_iterations,
            "recency_mean": np.round(self.recency.mean(axis=0), 4).tolist(),
            "temperature_mean": round(float(self.temperature.mean()), 4),
        }


def _history_features(chosen: np.ndarray, decays: tuple[float, ...]) -> np.ndarray:
    """chosen bool [iterations, experts] -> [iterations, experts, 1 + len(decays)] from earlier iterations."""
    n, experts = chosen.shape
    features = np.zeros((n, experts, 1 + len(decays)))
    if n < 2:
        return features
    features[1:, :, 0] = chosen[:-1]
    history = np.zeros((len(decays), experts))
    rates = np.asarray(decays)[:, None]
    for t in range(1, n):
        history = rates * history + (1 - rates) * chosen[t - 1]
        features[t, :, 1:] = history.T
    return features


def _layer_data(segments: list[np.ndarray], layer: int, num_experts: int, decays: tuple[float, ...]):
    history, upper, choices = [], [], []
    for seg in segments:
        chosen = choice_mask(seg[:, layer], num_experts)
        history.append(_history_features(chosen, decays))
        upper.append(choice_mask(seg[:, layer - 1], num_experts).astype(np.float64) if layer else
                     np.zeros(chosen.shape))
        choices.append(seg[:, layer])
    return np.concatenate(history), np.concatenate(upper), np.concatenate(choices)


def _ranking_nll(z: np.ndarray, choices: np.ndarray) -> tuple[float, np.ndarray]:
    """Negative log-likelihood of ordered top-k choices under Plackett-Luce with logits z, and d/dz."""
    n = len(z)
    rows = np.arange(n)
    taken = np.zeros(z.shape, dtype=bool)
    nll = 0.0
    grad = np.zeros_like(z)
    for j in range(choices.shape[1]):
        masked = np.where(taken, -np.inf, z)
        top = masked.max(axis=1, keepdims=True)
        p = np.exp(masked - top)
        total = p.sum(axis=1, keepdims=True)
        p /= total
        c = choices[:, j]
        nll -= float((z[rows, c] - top[:, 0] - np.log(total[:, 0])).sum())
        grad += p
        grad[rows, c] -= 1.0
        taken[rows, c] = True
    return nll, grad


def _fit_layer(history: np.ndarray, upper: np.ndarray, choices: np.ndarray, num_experts: int,
               reg: Regularization) -> np.ndarray:
    nrec = history.shape[2]
    penalty = np.concatenate([np.full(num_experts, reg.intercept), np.full(nrec, reg.recency),
                              np.full(num_experts * num_experts, reg.cross_layer)])

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        a, b, w = theta[:num_experts], theta[num_experts:num_experts + nrec], theta[num_experts + nrec:]
        w = w.reshape(num_experts, num_experts)
        z = a + history @ b + upper @ w
        nll, dz = _ranking_nll(z, choices)
        grad = np.concatenate([dz.sum(axis=0), np.einsum("ne,ner->r", dz, history), (upper.T @ dz).ravel()])
        return nll + 0.5 * float((penalty * theta * theta).sum()), grad + penalty * theta

    theta0 = np.zeros(num_experts + nrec + num_experts * num_experts)
    return minimize(objective, theta0, jac=True, method="L-BFGS-B").x


def fit_routing_model(segments: list[np.ndarray], num_experts: int, weights: list[np.ndarray] | None = None, *,
                      decays: tuple[float, ...] = DEFAULT_DECAYS, regularization: Regularization | None = None,
                      seed: int = 0) -> RoutingModel:
    """Fit to recorded routing: segments[r] int [iterations, layers, k], each row's experts ordered by
    weight (as traces store them); weights[r] their top-k weights (None: temperature 1)."""
    reg = regularization or Regularization()
    segments = [np.asarray(seg, dtype=np.int64) for seg in segments if len(seg)]
    layers, k = segments[0].shape[1:]
    nrec = 1 + len(decays)
    intercept = np.zeros((layers, num_experts))
    recency = np.zeros((layers, nrec))
    cross = np.zeros((layers, num_experts, num_experts))
    for layer in range(layers):
        history, upper, choices = _layer_data(segments, layer, num_experts, decays)
        theta = _fit_layer(history, upper, choices, num_experts, reg)
        intercept[layer] = theta[:num_experts]
        recency[layer] = theta[num_experts:num_experts + nrec]
        cross[layer] = theta[num_experts + nrec:].reshape(num_experts, num_experts)
    model = RoutingModel(layers, num_experts, k, tuple(decays), intercept, recency, cross, np.ones(layers), reg,
                         int(sum(len(seg) for seg in segments)))
    if weights is not None and k > 1:
        model.temperature = _fit_temperature(model, [len(seg) for seg in segments], weights, seed)
    return model


def _fit_temperature(model: RoutingModel, lengths: list[int], weights: list[np.ndarray], seed: int) -> np.ndarray:
    """Per layer: recorded mean log ratio of consecutive top-k weights over the model's mean logit gap."""
    recorded = np.concatenate([np.asarray(w, dtype=np.float64) for w in weights if len(w)])
    recorded = np.clip(recorded, 1e-6, None)
    ratio = np.log(recorded[..., :-1] / recorded[..., 1:]).mean(axis=(0, 2))
    gaps = np.zeros(model.num_layers)
    sample_routing(model, np.asarray(lengths), np.random.default_rng(seed), gap_totals=gaps)
    gap = gaps / (max(lengths) * len(lengths) * (model.top_k - 1))
    return np.where(gap > 0, ratio / np.maximum(gap, 1e-9), 1.0)


def _top_k_sorted(z: np.ndarray, k: int) -> np.ndarray:
    if k < z.shape[1]:
        part = np.argpartition(-z, k - 1, axis=1)[:, :k]
    else:
        part = np.tile(np.arange(z.shape[1]), (len(z), 1))
    order = np.argsort(-np.take_along_axis(z, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def sample_routing(model: RoutingModel, lengths: np.ndarray, rng: np.random.Generator,
                   offsets: np.ndarray | None = None, gap_totals: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Routing of len(lengths) requests generated together: per request (experts uint16 [n, layers, k]
    ordered by weight, top-k weights float32 [n, layers, k]). offsets: [requests, layers, experts]
    added to every iteration's logits (topics). gap_totals [layers]: if given, accumulates the logit
    gaps between consecutive chosen experts (to fit the temperature)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    r, steps = len(lengths), int(lengths.max()) if len(lengths) else 0
    layers, experts, k = model.num_layers, model.num_experts, model.top_k
    rates = np.asarray(model.decays)[:, None, None]
    out_experts = np.zeros((r, steps, layers, k), dtype=np.uint16)
    out_weights = np.zeros((r, steps, layers, k), dtype=np.float32)
    previous = np.zeros((layers, r, experts))
    history = np.zeros((layers, len(model.decays), r, experts))
    rows = np.arange(r)[:, None]
    for t in range(steps):
        upper = None
        for layer in range(layers):
            z = model.intercept[layer] + model.recency[layer, 0] * previous[layer] + rng.gumbel(size=(r, experts))
            z += np.tensordot(model.recency[layer, 1:], history[layer], axes=1)
            if upper is not None:
                z += upper @ model.cross_layer[layer]
            if offsets is not None:
                z += offsets[:, layer]
            top = _top_k_sorted(z, k)
            chosen_logits = np.take_along_axis(z, top, axis=1)
            if gap_totals is not None:
                gap_totals[layer] += float((chosen_logits[:, :-1] - chosen_logits[:, 1:]).sum())
            scaled = model.temperature[layer] * (chosen_logits - chosen_logits[:, :1])
            w = np.exp(scaled)
            out_experts[:, t, layer] = top
            out_weights[:, t, layer] = w / w.sum(axis=1, keepdims=True)
            chosen = np.zeros((r, experts))
            chosen[rows, top] = 1.0
            history[layer] = rates * history[layer] + (1 - rates) * chosen
            previous[layer] = chosen
            upper = chosen
    return [(out_experts[i, :n], out_weights[i, :n]) for i, n in enumerate(lengths)]


def request_offsets(spread: float, requests: int, layers: int, experts: int, rng: np.random.Generator) -> np.ndarray:
    """Independent per-request logit offsets [requests, layers, experts] of standard deviation `spread`."""
    return spread * rng.normal(size=(requests, layers, experts))


def fit_request_spread(model: RoutingModel, segments: list[np.ndarray], seed: int = 0, max_requests: int = 16,
                       max_iterations: int = 256, repeats: int = 8) -> float:
    """The spread of per-request offsets that makes generated requests differ from one another as much
    as the recorded ones do (mean popularity divergence, traces.stats); 0 with fewer than two requests.

    The model's own dynamics already make requests differ somewhat; the rest is the request's
    offset. Requests are truncated to max_iterations, and generated at the same lengths.
    """
    recorded = [np.asarray(seg[:max_iterations], dtype=np.int64) for seg in segments if len(seg)][:max_requests]
    if len(recorded) < 2:
        return 0.0
    target = float(popularity_divergence(recorded, model.num_experts).mean())
    lengths = np.array([len(seg) for seg in recorded])

    def divergence(spread: float) -> float:
        # `repeats` independent copies of the recorded set, generated in one batch.
        rng = np.random.default_rng(seed)
        batch = np.repeat(lengths, repeats)  # copy i is routed[i::repeats]
        routed = sample_routing(model, batch, rng, offsets=request_offsets(
            spread, len(batch), model.num_layers, model.num_experts, rng))
        copies = [[e.astype(np.int64) for e, _ in routed[i::repeats]] for i in range(repeats)]
        return float(np.mean([popularity_divergence(copy, model.num_experts).mean() for copy in copies]))

    low, high = 0.0, 2.0
    if divergence(low) >= target:
        return 0.0
    for _ in range(8):  # bisection: divergence grows with the spread
        middle = (low + high) / 2
        low, high = (middle, high) if divergence(middle) < target else (low, middle)
    return round((low + high) / 2, 3)
