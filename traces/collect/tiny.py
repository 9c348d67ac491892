"""Small random-weight MoE models of every supported architecture, with a byte-level tokenizer.

    python -m traces.collect.tiny OUT_DIR [--arch mixtral --layers 4 --hidden 64 --experts 8 --top-k 2 --seed 0 ...]

They exercise the collector end to end where no trained model can be had (tests, pipeline checks,
throughput). Random weights route nothing like a trained model (../shared/docs/routing-realism.md):
the directory's weights_origin.txt says so, and every trace collected from it carries that label.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from traces.cli import ConfigParser, run_cli
from traces.errors import UserError
from traces.format import write_directory

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


def moe_config(arch: str, *, layers: int, hidden: int, heads: int, experts: int, top_k: int, expert_width: int,
               shared_width: int | None = None, dense_layers: int = 0, vocab_size: int = VOCAB,
               special: tuple[int, int, int] = (BOS, EOS, PAD), **extra):
    """A transformers config of the given MoE architecture and shape (shared experts default to 2x the width)."""
    import transformers as tf

    from traces.collect.routers import supported_architectures

    head_dim = hidden // heads
    bos, eos, pad = special
    shared = 2 * expert_width if shared_width is None else shared_width
    common = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                  max_position_embeddings=4096, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
                  tie_word_embeddings=False, **extra)
    e, k, w = experts, top_k, expert_width
    mla = dict(num_key_value_heads=heads, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=head_dim,
               qk_rope_head_dim=head_dim, v_head_dim=head_dim, n_shared_experts=1, n_routed_experts=e,
               num_experts_per_tok=k, moe_intermediate_size=w, intermediate_size=shared)
    builders = {
        "mixtral": lambda: tf.MixtralConfig(**common, num_local_experts=e, num_experts_per_tok=k, intermediate_size=w),
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(**common, num_experts=e, num_experts_per_tok=k, moe_intermediate_size=w,
                                               shared_expert_intermediate_size=shared, intermediate_size=shared),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(**common, num_experts=e, num_experts_per_tok=k, moe_intermediate_size=w,
                                               intermediate_size=shared, head_dim=head_dim, norm_topk_prob=True),
        "olmoe": lambda: tf.OlmoeConfig(**common, num_experts=e, num_experts_per_tok=k, intermediate_size=w),
        "phimoe": lambda: tf.PhimoeConfig(**common, num_local_experts=e, num_experts_per_tok=k, intermediate_size=w),
        "deepseek_v2": lambda: tf.DeepseekV2Config(**{**common, **mla}, topk_method="greedy"),
        "deepseek_v3": lambda: tf.DeepseekV3Config(**{**common, **mla, "q_lora_rank": 24}, n_group=1, topk_group=1),
        "glm4_moe": lambda: tf.Glm4MoeConfig(**common, n_routed_experts=e, num_experts_per_tok=k, n_shared_experts=1,
                                             moe_intermediate_size=w, intermediate_size=shared, head_dim=head_dim,
                                             n_group=1, topk_group=1),
        "granitemoe": lambda: tf.GraniteMoeConfig(**common, num_local_experts=e, num_experts_per_tok=k,
                                                  intermediate_size=w),
        "gpt_oss": lambda: tf.GptOssConfig(**common, num_local_experts=e, num_experts_per_tok=k, intermediate_size=w,
                                           head_dim=head_dim),
    }
    if arch not in builders:
        raise UserError(f"arch={arch}: choose one of {supported_architectures()}")
    config = builders[arch]()
    if dense_layers:
        key = DENSE_LAYER_KEY.get(arch)
        if key is None or dense_layers >= layers:
            raise UserError(f"dense_layers={dense_layers}: only {', '.join(DENSE_LAYER_KEY)} have dense layers, "
                            f"and fewer than layers={layers}")
        setattr(config, key, dense_layers if key == "first_k_dense_replace" else list(range(dense_layers)))
    elif arch in ("deepseek_v2", "deepseek_v3", "glm4_moe"):
        config.first_k_dense_replace = 0
    return config


def _config(spec: TinyModel):
    return moe_config(spec.arch, layers=spec.layers, hidden=spec.hidden, heads=spec.heads, experts=spec.experts,
                      top_k=spec.top_k, expert_width=spec.expert_width, dense_layers=spec.dense_layers)


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
        raise UserError(f"{out} already exists; choose another output directory or pass --overwrite")
    model = build_model(spec)

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        byte_tokenizer().save_pretrained(tmp)
        (tmp / WEIGHTS_ORIGIN_FILE).write_text(
            f"random initialisation by traces.collect.tiny (arch={spec.arch}, seed={spec.seed}, "
            f"router_scale={spec.router_scale}): not a trained model, routing is not realistic\n")

    return write_directory(out, fill, spec.overwrite)


def build_parser() -> ConfigParser[TinyModel]:
    """The command's arguments: TinyModel's fields (the README's command lines are checked against it)."""
    return ConfigParser(TinyModel, "python -m traces.collect.tiny", __doc__)


def main(argv: list[str] | None = None) -> None:
    def work() -> None:
        spec = build_parser().parse_config(argv)
        print(f"wrote {write_model(spec)}")

    run_cli(work)


if __name__ == "__main__":
    main()
