import numpy as np

from traces.realism import neighbour_similarity, next_layer_accuracy, trajectory_accuracy

E, K, L = 8, 2, 8


def _deterministic(seed):
    rng = np.random.default_rng(seed)
    reqs = []
    for _ in range(6):
        first = np.stack([rng.choice(E, K, replace=False) for _ in range(200)])
        layers = [first]
        for _ in range(L - 1):
            layers.append((layers[-1] * 3 + 1) % E)      # layer l+1 = f(layer l), f a bijection
        reqs.append(np.stack(layers, axis=1))
    return reqs


def test_deterministic_routing_is_predicted_exactly():
    reqs = _deterministic(0)
    assert next_layer_accuracy(reqs, E) == 1.0
    assert all(v == 1.0 for v in trajectory_accuracy(reqs, E).values())


def test_independent_uniform_routing_is_at_chance():
    rng = np.random.default_rng(1)
    reqs = [np.stack([[rng.choice(E, K, replace=False) for _ in range(L)] for _ in range(400)]) for _ in range(4)]
    assert abs(next_layer_accuracy(reqs, E) - K / E) < 0.03
    acc = trajectory_accuracy(reqs, E)
    assert all(abs(v - K / E) < 0.03 for v in acc.values()), acc


def test_neighbour_similarity_on_constructed_embeddings():
    rng = np.random.default_rng(2)
    reqs, emb = [], []
    for group in range(2):
        for _ in range(5):
            experts = np.stack([[rng.choice(4, K, replace=False) + 4 * group for _ in range(L)] for _ in range(30)])
            reqs.append(experts)
            emb.append(np.eye(2)[group] + rng.normal(0, 0.01, 2))
    near, rand = neighbour_similarity(reqs, np.array(emb), E)
    assert near > 0.9 and rand < 0.6
