"""The collector records what each architecture's routers computed: checked against an independent,
unbatched, cache-free forward pass of the same tiny random-weight model, hooked by hand."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from traces.collect.prompts import PromptRequest  # noqa: E402
from traces.collect.routers import ARCHITECTURES, RouterTap, find_routers, hidden_projection, score  # noqa: E402
from traces.collect.runner import Generation, run_batch  # noqa: E402
from traces.collect.tiny import DENSE_LAYER_KEY, EOS, PAD, TinyModel, build_model  # noqa: E402

EXPERTS, TOP_K, PROJ_DIM, LOOKAHEAD = 6, 2, 4, 2
# Prompt lengths differ so the batch is padded; output lengths differ so requests finish at different steps.
PROMPTS = [(list(b"Hello MoE world"), 4), (list(b"hi"), 6), (list(b"routing, traced."), 1)]


def tiny(arch: str):
    dense = 1 if arch in DENSE_LAYER_KEY else 0
    return build_model(TinyModel(out="", arch=arch, layers=3 + dense, dense_layers=dense, experts=EXPERTS, top_k=TOP_K))


def collect(model, arch: str, generation: Generation = Generation(), batch_seed: int = 0):
    requests = [PromptRequest(f"r{i}", "", tuple(ids), out) for i, (ids, out) in enumerate(PROMPTS)]
    projection = hidden_projection(model.config.hidden_size, PROJ_DIM, seed=0)
    tap = RouterTap(find_routers(model), ARCHITECTURES[arch], EXPERTS, TOP_K, lookahead=LOOKAHEAD, projection=projection)
    with tap:
        results, timing = run_batch(model, tap, requests, generation, batch_seed=batch_seed, pad_id=PAD, eos_ids={EOS})
    return results, timing, projection


def reference_pass(model, tokens: list[int]) -> list[dict]:
    """Each MoE layer's router input, logits, weights and expert ids, and the expert ids its experts module
    received, for one sequence without batching or a KV cache."""
    seen, ran = [], []

    def on_router(module, args, output):
        seen.append({"module": module, "hidden": args[0].reshape(-1, args[0].shape[-1]),
                     "logits": output[0], "weights": output[1], "chosen": output[2]})

    def on_experts(module, args, kwargs):
        ran.append(next(a for a in (*args, *kwargs.values()) if torch.is_tensor(a) and not a.is_floating_point()))

    modules = dict(model.named_modules())
    handles = []
    for router in find_routers(model):
        handles.append(router.module.register_forward_hook(on_router))
        block = modules[router.name.rpartition(".")[0]]
        handles.append(block.experts.register_forward_pre_hook(on_experts, with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([tokens]))
    finally:
        for handle in handles:
            handle.remove()
    return [{**layer, "ran": experts} for layer, experts in zip(seen, ran, strict=True)]


def by_hand(router: torch.nn.Module, hidden: torch.Tensor, function: str) -> np.ndarray:
    """A router's gate applied to a hidden state with plain matrix algebra."""
    logits = hidden.float() @ router.weight.detach().float().T
    if getattr(router, "bias", None) is not None:
        logits = logits + router.bias.detach().float()
    return score(logits, function).numpy()


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_recorded_routing_equals_the_routers_own_outputs(arch):
    model = tiny(arch)
    function = ARCHITECTURES[arch].function
    results, timing, projection = collect(model, arch)
    assert timing.decode_steps == max(out for _, out in PROMPTS) - 1
    for result, (prompt, output_tokens) in zip(results, PROMPTS):
        assert len(result.output_ids) == output_tokens and result.prefill_iters == len(prompt)
        rows = len(prompt) + output_tokens - 1  # every prompt token, then one decode step per later output token
        assert result.probs.shape == (rows, len(find_routers(model)), EXPERTS)
        layers = reference_pass(model, prompt + result.output_ids[:-1])
        for layer, ref in enumerate(layers):
            # Probabilities: the router's own logits through the architecture's scoring function.
            np.testing.assert_allclose(result.probs[:, layer], score(ref["logits"], function).numpy(), atol=1e-5)
            # Experts: exactly the ones the layer's experts module was given to run.
            assert (np.sort(result.experts[:, layer], -1) == np.sort(ref["ran"].numpy(), -1)).all()
            # ...which for these configs are also the top-k of the recorded vectors.
            top = np.argsort(-result.probs[:, layer], axis=-1, kind="stable")[:, :TOP_K]
            assert (np.sort(top, -1) == np.sort(result.experts[:, layer], -1)).all()
            if arch != "phimoe":  # sparsemixer's expert weights are not derived from the softmax
                picked = np.take_along_axis(result.probs[:, layer], ref["chosen"].numpy(), -1)
                weights = ref["weights"].float().numpy()
                np.testing.assert_allclose(picked / picked.sum(-1, keepdims=True),
                                           weights / weights.sum(-1, keepdims=True), atol=1e-5)
            # Lookahead: the next layers' gates applied by hand to this layer's router input.
            for distance in range(1, LOOKAHEAD + 1):
                ahead = result.lookahead[:, layer, distance - 1]
                if layer + distance < len(layers):
                    expected = by_hand(layers[layer + distance]["module"], ref["hidden"], function)
                    np.testing.assert_allclose(ahead, expected, atol=1e-5)
                else:
                    assert np.isnan(ahead).all()
            np.testing.assert_allclose(result.hidden_proj[:, layer], ref["hidden"].numpy() @ projection, atol=1e-4)


def test_bias_corrected_router_records_the_experts_it_ran_not_the_top_k_of_its_scores():
    model = tiny("deepseek_v3")
    for router in find_routers(model):
        router.module.e_score_correction_bias[:] = torch.tensor([0.0, 0.0, 0.0, 0.0, 5.0, 5.0])  # always 4 and 5
    results, _, _ = collect(model, "deepseek_v3")
    for result in results:
        assert (np.sort(result.experts, -1) == [4, 5]).all()
        top = np.sort(np.argsort(-result.probs, axis=-1, kind="stable")[..., :TOP_K], -1)
        assert (top != [4, 5]).any()  # the recorded probabilities are the unbiased scores


def test_eos_ends_a_request_unless_ignored():
    model = tiny("mixtral")
    greedy, _, _ = collect(model, "mixtral")
    first = greedy[0].output_ids[0]
    stopped, _, _ = collect(model, "mixtral")
    assert [r.output_ids for r in stopped] == [r.output_ids for r in greedy]  # deterministic
    # Make the first greedy token of request 0 the end of sequence: it then stops after one token.
    with torch.no_grad():
        model.lm_head.weight[[first, EOS]] = model.lm_head.weight[[EOS, first]]
    stopped, _, _ = collect(model, "mixtral", Generation(ignore_eos=False))
    assert stopped[0].output_ids == [EOS] and len(stopped[0].probs) == len(PROMPTS[0][0])
    ignored, _, _ = collect(model, "mixtral", Generation(ignore_eos=True))
    assert len(ignored[0].output_ids) == PROMPTS[0][1]


def test_sampling_is_seeded():
    model = tiny("olmoe")
    once, _, _ = collect(model, "olmoe", Generation(temperature=1.0), batch_seed=3)
    again, _, _ = collect(model, "olmoe", Generation(temperature=1.0), batch_seed=3)
    other, _, _ = collect(model, "olmoe", Generation(temperature=1.0), batch_seed=4)
    assert [r.output_ids for r in once] == [r.output_ids for r in again] != [r.output_ids for r in other]


def test_bfloat16_as_on_a_gpu_records_the_float32_routing_within_rounding():
    model = tiny("mixtral")
    full, _, _ = collect(model, "mixtral")
    half, _, _ = collect(model.to(torch.bfloat16), "mixtral")
    for a, b in zip(full, half):
        prompt = slice(0, a.prefill_iters)  # decoding may take other tokens: compare the prompts' routing
        assert b.probs.dtype == np.float32 and np.abs(a.probs[prompt] - b.probs[prompt]).max() < 0.05
        assert (np.sort(a.experts[prompt], -1) == np.sort(b.experts[prompt], -1)).mean() > 0.9
