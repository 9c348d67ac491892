"""Import routing logs from elsewhere into the trace format.

    python -m traces.convert topk-jsonl SRC.jsonl OUT_DIR --model mixtral-8x7b [--prompts FILE]

topk-jsonl: one JSON object per (token, layer) with `experts` (top-k ids) and `gating_probs`
(their renormalised weights), grouped into requests by (`dataset`, `problem_id`) and ordered by
`token_idx`: the layout of speculative-moe's Mixtral logs in ../shared/data/routing/. Only the
top-k survive, so each imported probability vector has k non-zeros. The logs are decode-only, so
the requests have no prefill iterations. A token whose layers are not all logged (a log cut off
mid-token) ends its request; the metadata records how many were dropped.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from traces.cli import run_cli
from traces.errors import UserError
from traces.format import Provenance, TraceWriter
from traces.model_spec import ModelSpec, load_model_spec


def _read_jsonl(path: Path) -> list[dict]:
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror}); pass an existing JSON-lines file") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{number}: not valid JSON ({exc.msg}); fix or truncate that line") from None
    return rows


def _read_prompts(path: Path) -> dict[str, str]:
    prompts = {}
    for row in _read_jsonl(path):
        if "problem_id" not in row or "prompt" not in row:
            raise UserError(f"{path}: each line needs 'problem_id' and 'prompt'")
        prompts[str(row["problem_id"])] = row["prompt"]
    return prompts


def import_topk_jsonl(src: str | Path, out_dir: str | Path, model: ModelSpec, *, prompts: str | Path | None = None,
                      source_model: str | None = None, weights_origin: str = "unknown",
                      details: dict | None = None, overwrite: bool = False) -> Path:
    src = Path(src)
    rows = _read_jsonl(src)
    if not rows:
        raise UserError(f"{src}: no routing records")
    by_request: dict[tuple[str, str], dict[int, dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
    for number, row in enumerate(rows, 1):
        try:
            key = (str(row.get("dataset", "unknown")), str(row["problem_id"]))
            token, layer = int(row["token_idx"]), int(row["layer"])
            experts, weights = row["experts"], row["gating_probs"]
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{src}: record {number} lacks problem_id/token_idx/layer/experts/gating_probs ({exc})") from None
        if len(experts) != model.top_k or len(weights) != model.top_k:
            raise UserError(f"{src}: record {number} has {len(experts)} experts; model '{model.name}' routes top-{model.top_k}")
        if not 0 <= layer < model.num_layers or not all(0 <= e < model.num_experts for e in experts):
            raise UserError(f"{src}: record {number} (layer {layer}, experts {experts}) is outside model "
                            f"'{model.name}' ({model.num_layers} layers, {model.num_experts} experts)")
        by_request[key][token][layer] = row

    prompt_text = _read_prompts(Path(prompts)) if prompts else {}
    datasets = sorted({key[0] for key in by_request})
    dropped: dict[str, int] = {}
    writer = TraceWriter(out_dir, model, Provenance(
        model=source_model or model.name,
        weights_origin=weights_origin,
        dataset=",".join(datasets),
        tool="traces.convert topk-jsonl",
        notes="decode-only top-k log: each probability vector keeps only the logged top-k weights",
        details={"source_file": src.name, **(details or {})},
    ), overwrite=overwrite)
    for (dataset, problem), tokens in sorted(by_request.items(), key=lambda kv: (kv[0][0], _natural(kv[0][1]))):
        order = sorted(tokens)
        complete = []
        for expected, token in enumerate(order):
            if token != expected or len(tokens[token]) != model.num_layers:
                break
            complete.append(token)
        dropped[f"{dataset}/{problem}"] = len(order) - len(complete)
        if not complete:
            continue
        probs = np.zeros((len(complete), model.num_layers, model.num_experts), dtype=np.float32)
        experts = np.zeros((len(complete), model.num_layers, model.top_k), dtype=np.uint16)
        for i, token in enumerate(complete):
            for layer, row in tokens[token].items():
                experts[i, layer] = row["experts"]
                probs[i, layer, row["experts"]] = row["gating_probs"]
        writer.add_request(request_id=f"{dataset}-{problem}", dataset=dataset, probs=probs, experts=experts,
                           prefill_iters=0, prompt=prompt_text.get(problem), prompt_tokens=0,
                           output_tokens=len(complete))
    if writer.num_requests == 0:
        raise UserError(f"{src}: no request has a complete token (all {model.num_layers} layers logged)")
    return writer.close(extra={"incomplete_tokens_dropped": dropped})


def _natural(text: str) -> tuple[int, str]:
    return (int(text), "") if text.isdigit() else (sys.maxsize, text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m traces.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="format", required=True)
    topk = sub.add_parser("topk-jsonl", help="top-k routing log, one JSON object per token and layer")
    topk.add_argument("src", type=Path)
    topk.add_argument("out_dir", type=Path)
    topk.add_argument("--model", required=True, help="model profile name (conf/model) or a transformers config.json")
    topk.add_argument("--prompts", type=Path, help="JSON lines with problem_id and prompt")
    topk.add_argument("--source-model", help="the model that produced the log (hub id); default: the profile name")
    topk.add_argument("--weights-origin", default="unknown", help="where the weights came from (hub, quantisation...)")
    topk.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    args = parser.parse_args(argv)

    def work() -> None:
        out = import_topk_jsonl(args.src, args.out_dir, load_model_spec(args.model), prompts=args.prompts,
                                source_model=args.source_model, weights_origin=args.weights_origin,
                                overwrite=args.overwrite)
        print(f"wrote {out}")

    run_cli(work)


if __name__ == "__main__":
    main()
