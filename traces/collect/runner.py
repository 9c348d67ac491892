"""Load a transformers MoE model and run batches of requests (prefill, then decode) with the router tap on.

A batch is left-padded and prefilled in one forward pass; each prompt token's routing becomes one
prefill iteration of its request. The prefill pass yields the first output token; each decode step
then feeds every unfinished request its last token (one iteration each) until the request has its
output length (or, unless EOS is ignored, has produced EOS).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from traces.collect.prompts import PromptRequest
from traces.collect.routers import PassRouting, RouterTap, check_architecture
from traces.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIN_TRANSFORMERS = 5


@dataclass(frozen=True)
class Generation:
    temperature: float = 0.0  # 0: greedy
    ignore_eos: bool = True


@dataclass(frozen=True)
class RequestRouting:
    request: PromptRequest
    output_ids: list[int]  # generated tokens; the first comes from the prefill pass
    probs: np.ndarray  # float32 [prompt tokens + decode steps, layers, experts]
    experts: np.ndarray  # int64 [same rows, layers, top_k]
    lookahead: np.ndarray | None
    hidden_proj: np.ndarray | None
    token_mean: np.ndarray  # float32 [hidden]: the model's mean input embedding of the prompt tokens

    @property
    def prefill_iters(self) -> int:
        return len(self.request.input_ids)


@dataclass(frozen=True)
class BatchTiming:
    prefill_s: float
    decode_s: float
    decode_steps: int
    prompt_tokens: int
    output_tokens: int


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UserError(f"device={device}: not a torch device; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={device}: no CUDA GPU here; use --device cpu or auto")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"dtype={dtype}: choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_config(name: str):
    """The model's transformers config and router scoring; fails early on an unsupported model."""
    import transformers
    from transformers import AutoConfig

    if int(transformers.__version__.split(".")[0]) < MIN_TRANSFORMERS:
        raise UserError(f"transformers {transformers.__version__} is installed; the collector reads the MoE routers "
                        f"of transformers >= {MIN_TRANSFORMERS}: pip install -e '.[collect]'")
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise UserError(f"model={name}: cannot load a transformers config ({str(exc).splitlines()[0]}); "
                        "pass a model directory or a hub id available offline") from None
    return config, check_architecture(config)


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise UserError(f"model={name}: cannot load its tokenizer ({str(exc).splitlines()[0]})") from None


def load_model(name: str, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()  # the collection's own bar is the one to watch

    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise UserError(f"model={name}: cannot load it as a causal LM ({str(exc).splitlines()[0]})") from None
    return model.to(device).eval()


def _pick(logits: torch.Tensor, generation: Generation, rng: torch.Generator | None) -> torch.Tensor:
    if generation.temperature == 0:
        return logits.argmax(dim=-1)
    probs = (logits.float() / generation.temperature).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=rng).squeeze(-1)


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def run_batch(model, tap: RouterTap, requests: list[PromptRequest], generation: Generation, *, batch_seed: int,
              pad_id: int, eos_ids: set[int], on_tokens: Callable[[int], None] | None = None,
              ) -> tuple[list[RequestRouting], BatchTiming]:
    """Prefill and decode one batch; returns each request's routing rows (prefill first) and the batch's timing."""
    device = next(model.parameters()).device
    lengths = [len(r.input_ids) for r in requests]
    width = max(lengths)
    ids = torch.full((len(requests), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(requests), width), dtype=torch.long)
    for i, r in enumerate(requests):
        ids[i, width - lengths[i]:] = torch.tensor(r.input_ids)
        mask[i, width - lengths[i]:] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    rng = None
    if generation.temperature > 0:
        rng = torch.Generator(device=device)
        rng.manual_seed(batch_seed)

    start = _sync(device)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        prefill = tap.take()
        embedded = model.get_input_embeddings()(ids).float()
        token_mean = ((embedded * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).cpu().numpy()
        tokens = _pick(out.logits[:, -1], generation, rng)
        prefill_s = _sync(device) - start
        if on_tokens:
            on_tokens(sum(lengths))

        outputs = [[int(t)] for t in tokens.tolist()]
        targets = [r.output_tokens for r in requests]
        finished = [not generation.ignore_eos and out_ids[0] in eos_ids for out_ids in outputs]
        steps: list[PassRouting] = []
        active_per_step: list[list[int]] = []
        cache, last_position = out.past_key_values, positions[:, -1:]
        while True:
            active = [i for i, o in enumerate(outputs) if len(o) < targets[i] and not finished[i]]
            if not active:
                break
            mask = torch.cat([mask, mask.new_ones((len(requests), 1))], dim=1)
            last_position = last_position + 1
            out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=last_position,
                        past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(tap.take())
            active_per_step.append(active)
            tokens = _pick(out.logits[:, -1], generation, rng)
            for i, token in enumerate(tokens.tolist()):
                if i in active:
                    outputs[i].append(int(token))
                    finished[i] = not generation.ignore_eos and int(token) in eos_ids
            if on_tokens:
                on_tokens(len(active))
        decode_s = _sync(device) - start - prefill_s

    results = []
    for i, request in enumerate(requests):
        own_steps = [step for step, active in zip(steps, active_per_step) if i in active]
        first_row = i * width + width - lengths[i]  # the prefill pass flattens [batch, width] row-major

        def rows(name: str) -> np.ndarray | None:
            if getattr(prefill, name) is None:
                return None
            return np.concatenate([getattr(prefill, name)[first_row:(i + 1) * width]]
                                  + [getattr(step, name)[i:i + 1] for step in own_steps])

        results.append(RequestRouting(request, outputs[i], rows("probs"), rows("experts"), rows("lookahead"),
                                      rows("hidden_proj"), token_mean[i]))
    timing = BatchTiming(prefill_s, decode_s, len(steps), sum(lengths), sum(len(o) for o in outputs))
    return results, timing


def weights_origin(name: str, config) -> str:
    """Where the weights came from: the model directory's own note, the directory, or the hub id and revision."""
    from traces.collect.tiny import WEIGHTS_ORIGIN_FILE

    path = Path(name)
    if (path / WEIGHTS_ORIGIN_FILE).is_file():
        return (path / WEIGHTS_ORIGIN_FILE).read_text().strip()
    if path.is_dir():
        return f"local directory {path.resolve()}"
    revision = getattr(config, "_commit_hash", None)
    return f"hub {name}" + (f" at revision {revision}" if revision else "")

