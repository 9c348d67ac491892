"""Small random-weight MoE models of every supported architecture, with a byte-level tokenizer.

    python -m traces.collect.tiny out=DIR arch=mixtral [layers=4 hidden=64 experts=8 top_k=2 seed=0 ...]

They exercise the collector end to end where no trained model can be had (tests, pipeline checks,
throughput). Random weights route nothing like a trained model (../shared/docs/routing-realism.md):
the directory's weights_origin.txt says so, and every trace collected from it carries that label.
"""
from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from traces.cli import parse_key_values, run_cli
from traces.errors import UserError
from traces.format import replace_directory

BOS, EOS, PAD = 256, 257, 258
VOCAB = 259  # the 256 bytes and three special tokens
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
WEIGHTS_ORIGIN_FILE = "weights_origin.txt"
DENSE_LAYER_KEY = {"deepseek_v2": "first_k_dense_replace", "deepseek_v3": "first_k_dense_replace",
                   "glm4_moe": "first_k_dense_replace", "qwen2_moe": "mlp_only_layers", "qwen3_moe": "mlp_only_layers"}


@dataclass(frozen=True)
class TinyModel:
    out: str
    arch: str = "mixtral"
    layers: int = 2
    hidden: int = 32
    experts: int = 4
    top_k: int = 2
    expert_width: int = 32
    heads: int = 4
    dense_layers: int = 0  # leading layers with a dense MLP (DeepSeek, GLM and Qwen MoE only)
    router_scale: float = 2.0  # spread of the router logits: larger, peakier routing
    seed: int = 0
    overwrite: bool = False

    def __post_init__(self) -> None:
        sizes = ("layers", "hidden", "experts", "top_k", "expert_width", "heads")
        if min(getattr(self, name) for name in sizes) < 1 or self.dense_layers < 0:
            raise UserError(f"tiny model: {', '.join(sizes)} must be at least 1 and dense_layers at least 0")
        if self.top_k > self.experts or self.hidden % self.heads:
            raise UserError(f"tiny model: top_k={self.top_k} must not exceed experts={self.experts}, "
                            f"and heads={self.heads} must divide hidden={self.hidden}")


def _config(spec: TinyModel):
    import transformers as tf

    from traces.collect.routers import supported_architectures

    head_dim = spec.hidden // spec.heads
    common = dict(vocab_size=VOCAB, hidden_size=spec.hidden, num_hidden_layers=spec.layers,
                  num_attention_heads=spec.heads, num_key_value_heads=max(1, spec.heads // 2),
                  max_position_embeddings=4096, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
                  tie_word_embeddings=False)
    e, k, w = spec.experts, spec.top_k, spec.expert_width
    mla = dict(num_key_value_heads=spec.heads, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=head_dim,
               qk_rope_head_dim=head_dim, v_head_dim=head_dim, n_shared_experts=1, n_routed_experts=e,
               num_experts_per_tok=k, moe_intermediate_size=w, intermediate_size=2 * w)
    builders = {
        "mixtral": lambda: tf.MixtralConfig(**common, num_local_experts=e, num_experts_per_tok=k, intermediate_size=w),
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(**common, num_experts=e, num_experts_per_tok=k, moe_intermediate_size=w,
                                               shared_expert_intermediate_size=2 * w, intermediate_size=2 * w),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(**common, num_experts=e, num_experts_per_tok=k, moe_intermediate_size=w,
                                               intermediate_size=2 * w, head_dim=head_dim, norm_topk_prob=True),
        "olmoe": lambda: tf.OlmoeConfig(**common, num_experts=e, num_experts_per_tok=k, intermediate_size=w),
        "phimoe": lambda: tf.PhimoeConfig(**common, num_local_experts=e, num_experts_per_tok=k, intermediate_size=w),
        "deepseek_v2": lambda: tf.DeepseekV2Config(**{**common, **mla}, topk_method="greedy"),
        "deepseek_v3": lambda: tf.DeepseekV3Config(**{**common, **mla, "q_lora_rank": 24}, n_group=1, topk_group=1),
        "glm4_moe": lambda: tf.Glm4MoeConfig(**common, n_routed_experts=e, num_experts_per_tok=k, n_shared_experts=1,
                                             moe_intermediate_size=w, intermediate_size=2 * w, head_dim=head_dim,
                                             n_group=1, topk_group=1),
        "granitemoe": lambda: tf.GraniteMoeConfig(**common, num_local_experts=e, num_experts_per_tok=k,
                                                  intermediate_size=w),
        "gpt_oss": lambda: tf.GptOssConfig(**common, num_local_experts=e, num_experts_per_tok=k, intermediate_size=w,
                                           head_dim=head_dim),
    }
    if spec.arch not in builders:
        raise UserError(f"arch={spec.arch}: choose one of {supported_architectures()}")
    config = builders[spec.arch]()
    if spec.dense_layers:
        key = DENSE_LAYER_KEY.get(spec.arch)
        if key is None or spec.dense_layers >= spec.layers:
            raise UserError(f"dense_layers={spec.dense_layers}: only {', '.join(DENSE_LAYER_KEY)} have dense layers, "
                            f"and fewer than layers={spec.layers}")
        setattr(config, key, spec.dense_layers if key == "first_k_dense_replace" else list(range(spec.dense_layers)))
    elif spec.arch in ("deepseek_v2", "deepseek_v3", "glm4_moe"):
        config.first_k_dense_replace = 0
    return config


def byte_tokenizer():
    """A byte-level tokenizer (one token per UTF-8 byte, BOS added) with a small chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_of))}
    vocab.update({"<s>": BOS, "</s>": EOS, "<pad>": PAD})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _byte_of(char: str) -> int:
    # GPT-2's byte-to-unicode map: printable bytes keep their code point, the rest are shifted above 255.
    code = ord(char)
    if code < 256:
        return code
    shifted = [b for b in range(256) if not (33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255)]
    return shifted[code - 256]


def build_model(spec: TinyModel):
    """The random-weight model in memory (eval mode, float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    from traces.collect.routers import find_routers

    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(_config(spec)).eval()
    with torch.no_grad():
        for router in find_routers(model):
            # Default init gives near-uniform router probabilities; spread them as a trained router does.
            router.module.weight.normal_(0.0, spec.router_scale / spec.hidden ** 0.5)
            if getattr(router.module, "bias", None) is not None:
                router.module.bias.zero_()
    return model


def write_model(spec: TinyModel) -> Path:
    """Build and save model, tokenizer and weights origin into spec.out (atomically)."""
    out = Path(spec.out)
    if out.exists() and not spec.overwrite:
        raise UserError(f"{out} already exists; choose another out= or pass overwrite=true")
    model = build_model(spec)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        byte_tokenizer().save_pretrained(tmp)
        (tmp / WEIGHTS_ORIGIN_FILE).write_text(
            f"random initialisation by traces.collect.tiny (arch={spec.arch}, seed={spec.seed}, "
            f"router_scale={spec.router_scale}): not a trained model, routing is not realistic\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_directory(tmp, out, spec.overwrite)
    return out


def main(argv: list[str] | None = None) -> None:
    def work() -> None:
        spec = parse_key_values(sys.argv[1:] if argv is None else argv, TinyModel, __doc__ or "")
        print(f"wrote {write_model(spec)}")

    run_cli(work)


if __name__ == "__main__":
    main()
