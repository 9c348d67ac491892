"""Train a stand-in MoE language model of a real model's routing shape on the stand-in corpus.

    python -m traces.standin.train SHAPE CORPUS_DIR OUT_DIR [--FLAG VALUE ...]

Arguments (defaults below in TrainConfig; a key below is the flag --key, dashes for underscores):
  SHAPE              mixtral-8x7b | qwen1.5-moe | phi-3.5-moe (layers, experts, top-k, shared expert)
  hidden, heads      width of the stand-in (expert widths keep the real model's ratios to it)
  steps              optimiser steps; max_minutes stops earlier (0: never) and the output says so.
                     The learning rate is constant after warm-up, so a run stopped at step N is the
                     run of --steps N.
  batch_tokens, context, lr, warmup_steps, weight_decay, dropout (attention and residual branches)
  aux_loss, aux_scope  load-balancing loss (Switch/transformers form, k at perfect balance) over the
                     whole batch, or per sequence (each conversation pushed to use every expert)
  router_input       hidden (as the architecture does) | detached (the router's gradient stops at its
                     input, so routing cannot shape the hidden states)
  eval_every         steps between held-out probes (loss, perplexity, routing realism)
  seed, device, overwrite, progress

OUT_DIR holds standin-SHAPE-hHIDDEN/ (transformers checkpoint, tokenizer, weights_origin.txt that traces.collect records),
train_log.csv, eval_log.csv, curves.png and summary.json. Runs are reproducible from the seed up to
the GPU's own nondeterminism.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from traces.cli import ConfigParser, run_cli
from traces.collect.tiny import WEIGHTS_ORIGIN_FILE
from traces.errors import UserError
from traces.format import write_directory
from traces.standin.preflight import check_train
from traces.standin.realism_probe import flat_figures, probe
from traces.standin.shapes import get_shape, standin_config

AUX_SCOPES = ("batch", "sequence")
ROUTER_INPUTS = ("hidden", "detached")


@dataclass(frozen=True)
class TrainConfig:
    shape: str
    corpus: str
    out: str
    hidden: int = 256
    heads: int = 4
    steps: int = 2000
    max_minutes: float = 0.0
    batch_tokens: int = 16384
    context: int = 256
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    dropout: float = 0.0
    aux_loss: float = 0.02
    aux_scope: str = "batch"
    router_input: str = "hidden"
    eval_every: int = 250
    seed: int = 0
    device: str = "auto"
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        get_shape(self.shape)
        if self.aux_scope not in AUX_SCOPES or self.router_input not in ROUTER_INPUTS:
            raise UserError(f"aux_scope must be one of {AUX_SCOPES} and router_input one of {ROUTER_INPUTS}")
        if min(self.hidden, self.heads, self.steps, self.context, self.eval_every) < 1 or self.batch_tokens < self.context:
            raise UserError("hidden, heads, steps, context and eval_every must be at least 1, batch_tokens at least context")
        if not 0 <= self.dropout < 1 or self.lr <= 0 or self.aux_loss < 0 or self.max_minutes < 0:
            raise UserError("dropout must lie in [0, 1), lr be positive, aux_loss and max_minutes non-negative")

    @property
    def batch_size(self) -> int:
        return self.batch_tokens // self.context


def balance_loss(router_logits, top_k: int, batch: int, scope: str):
    """num_experts * sum_i (share of top-k choices on i) * (mean router probability of i), averaged over
    layers and over the batch (scope=batch) or each sequence (scope=sequence); k at perfect balance."""
    import torch

    logits = torch.stack([layer.float() for layer in router_logits])  # [layers, tokens, experts]
    layers, tokens, experts = logits.shape
    groups = batch if scope == "sequence" else 1
    probs = logits.softmax(-1).view(layers, groups, tokens // groups, experts)
    chosen = torch.zeros_like(probs).scatter_(-1, probs.topk(top_k, dim=-1).indices, 1.0)
    per_group = (chosen.mean(dim=2) * probs.mean(dim=2)).sum(-1) * experts  # [layers, groups]
    return per_group.mean()


def add_residual_dropout(model, p: float) -> None:
    """Dropout on every attention and MoE block's output before it joins the residual stream."""
    import torch.nn.functional as F

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (F.dropout(output[0], p, module.training), *output[1:])
        return F.dropout(output, p, module.training)

    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(hook)
        layer.mlp.register_forward_hook(hook)


def detach_router_inputs(model) -> None:
    from traces.collect.routers import find_routers

    for router in find_routers(model):
        router.module.register_forward_pre_hook(lambda module, args: (args[0].detach(), *args[1:]))


def build_model(cfg: TrainConfig, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    special = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    config = standin_config(get_shape(cfg.shape), hidden=cfg.hidden, heads=cfg.heads, vocab_size=len(tokenizer),
                            special=special, dropout=cfg.dropout)
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(config)
    if cfg.dropout:
        add_residual_dropout(model, cfg.dropout)
    if cfg.router_input == "detached":
        detach_router_inputs(model)
    return model


def load_corpus(path: Path, context: int):
    from transformers import AutoTokenizer

    needed = ("tokenizer", "train_tokens.npy", "eval_tokens.npy", "corpus.json")
    missing = [name for name in needed if not (path / name).exists()]
    if missing:
        raise UserError(f"corpus={path}: {', '.join(missing)} missing; build it with python -m traces.standin.corpus {path}")
    tokens = np.load(path / "train_tokens.npy", mmap_mode="r")
    if len(tokens) <= context + 1:
        raise UserError(f"corpus={path}: {len(tokens)} training tokens, fewer than one context of {context}")
    return AutoTokenizer.from_pretrained(path / "tokenizer"), tokens, np.load(path / "eval_tokens.npy"), \
        json.loads((path / "corpus.json").read_text())


def sample_batch(tokens: np.ndarray, rng: np.random.Generator, batch: int, context: int) -> np.ndarray:
    starts = rng.integers(0, len(tokens) - context - 1, size=batch)
    return np.stack([tokens[s:s + context + 1] for s in starts]).astype(np.int64)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr


def train(cfg: TrainConfig) -> Path:
    """Train, probe every eval_every steps, and write OUT atomically; returns OUT."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from traces.collect.runner import resolve_device

    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise UserError(f"{out} already exists; choose another out= or pass overwrite=true")
    tokenizer, tokens, evaluation, corpus_info = load_corpus(Path(cfg.corpus), cfg.context)
    device = resolve_device(cfg.device)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    model = build_model(cfg, tokenizer).to(device).train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimiser = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    rng = np.random.default_rng(cfg.seed)
    name = Path(cfg.out).name
    train_rows: list[dict[str, Any]] = []
    eval_rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    stopped_by = "steps"

    def evaluate(step: int) -> dict[str, Any]:
        result = probe(model, evaluation, autocast, name)
        eval_rows.append({"step": step, "tokens": step * cfg.batch_size * cfg.context,
                          "elapsed_s": time.perf_counter() - started, **flat_figures(result)})
        return result

    evaluate(0)
    step, last_loss = 0, float("nan")
    bar = tqdm(total=cfg.steps, desc=f"train {name}", disable=not cfg.progress, mininterval=5)
    while step < cfg.steps:
        if cfg.max_minutes and time.perf_counter() - started > cfg.max_minutes * 60:
            stopped_by = f"max_minutes={cfg.max_minutes}"
            break
        for group in optimiser.param_groups:
            group["lr"] = learning_rate(cfg, step)
        batch = torch.as_tensor(sample_batch(tokens, rng, cfg.batch_size, cfg.context)).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            output = model(input_ids=batch[:, :-1], output_router_logits=True, use_cache=False)
        ce = F.cross_entropy(output.logits.float().flatten(0, 1), batch[:, 1:].flatten())
        aux = balance_loss(output.router_logits, model.config.num_experts_per_tok, cfg.batch_size, cfg.aux_scope)
        (ce + cfg.aux_loss * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
        step += 1
        last_loss = ce.item()
        if step % 10 == 0 or step == cfg.steps:
            train_rows.append({"step": step, "tokens": step * cfg.batch_size * cfg.context,
                               "elapsed_s": time.perf_counter() - started, "lr": learning_rate(cfg, step - 1),
                               "train_loss_nats": last_loss, "balance_loss": aux.item()})
            bar.set_postfix(loss=f"{train_rows[-1]['train_loss_nats']:.3f}")
        bar.update(1)
        if step % cfg.eval_every == 0 and step < cfg.steps:
            evaluate(step)
    bar.close()
    final = evaluate(step)
    summary = {
        "settings": asdict(cfg), "shape": asdict(get_shape(cfg.shape)), "steps_done": step, "stopped_by": stopped_by,
        "tokens_seen": step * cfg.batch_size * cfg.context, "epochs": step * cfg.batch_size * cfg.context / len(tokens),
        "wall_s": time.perf_counter() - started, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else "cpu", "parameters": sum(p.numel() for p in model.parameters()),
        "final_train_loss_nats": last_loss,
        "heldout_loss_nats": final["heldout_loss"], "heldout_perplexity": final["heldout_perplexity"],
        "realism": final["realism"], "corpus": corpus_info,
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
    }
    return _write(out, cfg, model, tokenizer, summary, train_rows, eval_rows)


def checkpoint_name(cfg: TrainConfig) -> str:
    """The checkpoint's directory in OUT, which traces.collect records as the model's name."""
    return f"standin-{cfg.shape}-h{cfg.hidden}"


def weights_origin(summary: dict[str, Any]) -> str:
    s, shape = summary["settings"], summary["shape"]
    return (f"trained stand-in (traces.standin.train, seed {s['seed']}): {shape['model']} routing shape "
            f"({shape['layers']} layers, {shape['experts']} experts, top-{shape['top_k']}) at hidden {s['hidden']}, "
            f"{summary['parameters'] / 1e6:.0f}M parameters, {summary['steps_done']} steps, "
            f"{summary['tokens_seen'] / 1e6:.1f}M tokens of ShareGPT ({summary['corpus']['train_conversations']} "
            f"training conversations), final train loss {summary['final_train_loss_nats']:.2f}, held-out perplexity "
            f"{summary['heldout_perplexity']:.1f}; lr {s['lr']}, context {s['context']}, aux {s['aux_loss']} "
            f"per {s['aux_scope']}, dropout {s['dropout']}, router input {s['router_input']}")


def _write(out: Path, cfg: TrainConfig, model, tokenizer, summary: dict[str, Any], train_rows: list[dict],
           eval_rows: list[dict]) -> Path:
    import pandas as pd

    from traces.standin.curves import plot_curves

    def fill(tmp: Path) -> None:
        checkpoint = tmp / checkpoint_name(cfg)
        model.save_pretrained(checkpoint)
        tokenizer.save_pretrained(checkpoint)
        (checkpoint / WEIGHTS_ORIGIN_FILE).write_text(weights_origin(summary) + "\n")
        pd.DataFrame(train_rows).to_csv(tmp / "train_log.csv", index=False)
        pd.DataFrame(eval_rows).to_csv(tmp / "eval_log.csv", index=False)
        plot_curves(pd.DataFrame(train_rows), pd.DataFrame(eval_rows), tmp / "curves.png", title=out.name)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1, default=str))

    return write_directory(out, fill, cfg.overwrite)


def build_parser() -> ConfigParser[TrainConfig]:
    """The command's arguments: TrainConfig's fields (the README's command lines are checked against it)."""
    return ConfigParser(TrainConfig, "python -m traces.standin.train", __doc__)


def main(argv: list[str] | None = None) -> None:
    def work() -> None:
        cfg = build_parser().parse_config(argv)
        corpus = Path(cfg.corpus) / "corpus.json"
        if corpus.is_file():  # else train() names what is missing
            check_train(cfg, json.loads(corpus.read_text())["vocab_size"])
        out = train(cfg)
        summary = json.loads((out / "summary.json").read_text())
        realism = summary["realism"]
        print(f"wrote {out}: {summary['steps_done']} steps ({summary['stopped_by']}), held-out perplexity "
              f"{summary['heldout_perplexity']:.1f}, token reuse {realism['token_reuse']:.1%}, "
              f"distance to real {realism['distance_to_real']}")

    run_cli(work)


if __name__ == "__main__":
    main()
