"""Realism statistics that measure what predictors exploit: next-layer predictability, trajectory-
match accuracy at distances 1-6, prompt-neighbour routing similarity. Deterministic (fixed splits).

All functions take per-request chosen-expert arrays [tokens, layers, k]; the split is by request
index parity (even = store/train, odd = held out; a lone request is split into its halves), so no
figure is in-sample. The trajectory search scores a fixed-seed sample of at most MAX_QUERIES
held-out tokens against a fixed-seed sample of at most MAX_STORE training tokens (bounded cost)."""
from __future__ import annotations

import numpy as np

from policies.matching import best_match, unit

MAX_STORE = 4000   # store tokens for the trajectory search (a seeded sample: bounded cost)
MAX_QUERIES = 1000
SAMPLE_SEED = 0


def _halves(requests: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Even requests train, odd ones are held out; one request is cut in two halves."""
    nonempty = [r for r in requests if len(r)]
    if len(nonempty) == 1:
        half = len(nonempty[0]) // 2
        requests = [nonempty[0][:half], nonempty[0][half:]]
    return ([r for i, r in enumerate(requests) if i % 2 == 0 and len(r)],
            [r for i, r in enumerate(requests) if i % 2 == 1 and len(r)])


def splittable(requests: list[np.ndarray]) -> bool:
    """Whether the predictor figures can be measured: a non-empty training and held-out part."""
    train, test = _halves(requests)
    return bool(train and test)


def _split(requests: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    train, test = _halves(requests)
    if not train or not test:
        raise ValueError("realism statistics need at least two non-empty requests")
    return np.concatenate(train), np.concatenate(test)


def _onehot(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """[tokens, layers, k] -> [tokens, layers, experts] 0/1."""
    out = np.zeros(experts.shape[:2] + (num_experts,), dtype=np.float32)
    np.put_along_axis(out, experts.astype(np.intp), 1.0, axis=-1)
    return out


def _overlap(pred: np.ndarray, actual: np.ndarray) -> float:
    """Mean fraction of the actual experts ([n, k]) that the predicted sets ([n, k]) contain."""
    return float((pred[:, :, None] == actual[:, None, :]).any(axis=1).mean())


def next_layer_accuracy(requests: list[np.ndarray], num_experts: int) -> float | None:
    """Top-k accuracy of layer l+1's experts predicted from layer l's through the empirical
    conditional of the training requests, on the held-out ones (chance = k / experts); None for
    a one-layer model."""
    train, test = _split(requests)
    hot_tr, hot_te = _onehot(train, num_experts), _onehot(test, num_experts)
    k = train.shape[2]
    hits = []
    for layer in range(train.shape[1] - 1):
        cond = hot_tr[:, layer].T @ hot_tr[:, layer + 1]          # [e, e'] co-occurrence counts
        score = hot_te[:, layer] @ cond
        pred = np.argsort(-score, axis=1, kind="stable")[:, :k]
        hits.append(_overlap(pred, test[:, layer + 1]))
    return float(np.mean(hits)) if hits else None


def trajectory_accuracy(requests: list[np.ndarray], num_experts: int, distances=range(1, 7)) -> dict[int, float]:
    """FineMoE-style search: a held-out token's routing up to layer l (one-hot trajectory) is matched
    by cosine against a store of training-request tokens; the best match's experts at layer l+d are
    the prediction. Mean accuracy over layers, per distance d."""
    train, test = _split(requests)
    rng = np.random.default_rng(SAMPLE_SEED)
    if len(train) > MAX_STORE:
        train = train[np.sort(rng.choice(len(train), MAX_STORE, replace=False))]
    if len(test) > MAX_QUERIES:
        test = test[np.sort(rng.choice(len(test), MAX_QUERIES, replace=False))]
    hot_tr, hot_te = _onehot(train, num_experts), _onehot(test, num_experts)
    layers = train.shape[1]
    stamps = np.arange(len(train))
    out: dict[int, list[float]] = {d: [] for d in distances}
    for layer in range(layers - 1):
        store = unit(hot_tr[:, :layer + 1].reshape(len(train), -1))
        query = unit(hot_te[:, :layer + 1].reshape(len(test), -1))
        sim = query @ store.T
        match = np.array([best_match(row, stamps) for row in sim])
        for d in distances:
            if layer + d < layers:
                out[d].append(_overlap(train[match, layer + d], test[:, layer + d]))
    return {d: float(np.mean(v)) for d, v in out.items() if v}


def neighbour_similarity(requests: list[np.ndarray], embeddings: np.ndarray, num_experts: int) -> tuple[float, float]:
    """Needs three requests or more (with two, the neighbour is the only other one). (mean cosine of per-request per-layer expert-frequency vectors between each request and its
    nearest prompt-embedding neighbour, the same over all other pairs)."""
    freq = np.stack([_onehot(r, num_experts).mean(axis=0).ravel() for r in requests])
    f, e = unit(freq), unit(embeddings)
    route, emb = f @ f.T, e @ e.T
    np.fill_diagonal(emb, -np.inf)
    nearest = np.argmax(emb, axis=1)
    n = len(requests)
    off = ~np.eye(n, dtype=bool)
    return float(route[np.arange(n), nearest].mean()), float(route[off].mean())


def probabilities_known(trace) -> str:
    """'full' (dense router probabilities), 'top-m' (only the recorded top-m) or 'unknown'."""
    known = getattr(trace, "probs_known", None)
    if known is not None:
        return {"topm": "top-m"}.get(known, known)
    return "full" if getattr(trace, "_dense", None) is not None else "top-m"
