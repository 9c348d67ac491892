"""The on-disk trace format (version 2; version 1 traces still read): one directory per trace.

    meta.json             format version, model shape, provenance, layout, realism figures
    requests.parquet      one row per request (ids, dataset, subject, prompt, token counts, arrival, offsets)
    experts.npy           uint16 [iterations, layers, top_k]: experts each iteration actually ran
    probs.npy             float16 [iterations, layers, experts]: full router probabilities (dense layout)
    topm_experts.npy      uint16  [iterations, layers, m]   } sparse layout for large expert counts:
    topm_probs.npy        float16 [iterations, layers, m]   } the m most probable experts only
    prefill_counts.npy    uint32 [requests, layers, experts]: prompt tokens that chose each expert
    embeddings/NAME.npy   float32 [requests, dim]: prompt embeddings (NaN rows where unknown)
    lookahead.npy         float16 [iterations, layers, distance, experts] (optional): gates of layers
                          l+1..l+distance applied to layer l's hidden state
    hidden_proj.npy       float16 [iterations, layers, dim] (optional): low-dim hidden-state projection

Unknown probabilities. A topm trace recorded only the m most probable experts of each (iteration,
layer): the other probabilities are unknown, not zero (meta `probs_known`: "full" | "topm"), and
Trace.probs() returns them as NaN unless the caller names another value. Policies turn them into
numbers only through policies.base.known_probs (see there). A dense trace is full: every value
was recorded. Version 1 had no `probs_known`; it reads as "topm" for the topm layout, else "full".

Prefill. meta `prefill_recorded` says whether the prompts' routing was recorded (prefill rows or
prefill_counts); when it was not, the simulator leaves prefill expert work out of TTFT and says so.
Version 1 traces infer it from their data.

A request's iterations are rows iter_offset .. iter_offset + prefill_iters + decode_iters: first its
prefill iterations (one per prompt token, as FineMoE counts them; none for decode-only logs), then
one per decode step. Arrays are memory-mapped on read. The writer builds the directory under a
temporary name and renames it into place, so a crash never leaves a half-written trace.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from traces.errors import TraceError, UserError
from traces.model_spec import ModelSpec

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: before probs_known and prefill_recorded (inferred on read)
PROBS_KNOWN = ("full", "topm")

META = "meta.json"
REQUESTS = "requests.parquet"
EXPERTS = "experts.npy"
PROBS = "probs.npy"
TOPM_EXPERTS = "topm_experts.npy"
TOPM_PROBS = "topm_probs.npy"
PREFILL_COUNTS = "prefill_counts.npy"
EMBEDDINGS_DIR = "embeddings"
LOOKAHEAD = "lookahead.npy"
HIDDEN_PROJ = "hidden_proj.npy"

REQUEST_COLUMNS = {
    "request_id": pa.string(),
    "dataset": pa.string(),
    "prompt": pa.string(),
    "prompt_tokens": pa.int32(),
    "output_tokens": pa.int32(),
    "arrival_s": pa.float64(),
    "iter_offset": pa.int64(),
    "prefill_iters": pa.int32(),
    "decode_iters": pa.int32(),
}
OPTIONAL_COLUMNS = {"subject": pa.string()}  # version 2: what the prompt is about (a benchmark's subject)


@dataclass(frozen=True)
class Provenance:
    """Where a trace's routing came from; shown beside every result that uses it."""

    model: str
    weights_origin: str
    dataset: str
    tool: str
    notes: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def label(self) -> str:
        return f"{self.model} [{self.weights_origin}] on {self.dataset} (via {self.tool})"


@dataclass(frozen=True)
class TraceMeta:
    format_version: int
    model: ModelSpec
    source: Provenance
    num_requests: int
    num_iterations: int
    probs_layout: str  # "dense" | "topm"
    topm: int
    embeddings: dict[str, int]
    default_embedding: str | None
    lookahead_distance: int
    hidden_proj_dim: int
    realism: dict[str, Any]
    extra: dict[str, Any]
    probs_known: str = "full"  # "full": every router probability recorded; "topm": only the topm largest
    prefill_recorded: bool | None = None  # None (version 1): inferred from the arrays on load

    def to_json(self) -> str:
        data = asdict(self)
        data["model"] = self.model.to_dict()
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> TraceMeta:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TraceError(f"{where}: not valid JSON ({exc}); the trace is corrupt, re-create it") from None
        version = data.get("format_version")
        if version not in READABLE_VERSIONS:
            raise TraceError(
                f"{where}: trace format version {version!r}, this reader reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}; convert the trace again with this version's tools"
            )
        if version == 1:
            data.setdefault("probs_known", "topm" if data.get("probs_layout") == "topm" else "full")
        try:
            data["model"] = ModelSpec.from_dict(data["model"])
            data["source"] = Provenance(**data["source"])
            meta = cls(**data)
        except (KeyError, TypeError) as exc:
            raise TraceError(f"{where}: missing or unexpected field ({exc}); the trace is corrupt, re-create it") from None
        if meta.probs_known not in PROBS_KNOWN or (meta.probs_known == "topm") != (meta.probs_layout == "topm"):
            raise TraceError(f"{where}: probs_known '{meta.probs_known}' does not fit probs_layout "
                             f"'{meta.probs_layout}' (topm layout: topm, dense: full); re-create the trace")
        return meta


def top_k_experts(probs: np.ndarray, k: int) -> np.ndarray:
    """Top-k experts by probability; ties go to the lower expert index (stable order)."""
    return np.argsort(-np.asarray(probs, dtype=np.float32), axis=-1, kind="stable")[..., :k].astype(np.uint16)


def tally_experts(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """[tokens, layers, k] chosen experts -> [layers, experts] how many tokens chose each."""
    layers = experts.shape[1]
    counts = np.zeros((layers, num_experts), dtype=np.uint32)
    for layer in range(layers):
        counts[layer] = np.bincount(experts[:, layer, :].ravel(), minlength=num_experts)
    return counts


class Trace:
    """A validated, memory-mapped trace directory. Construct with load_trace()."""

    def __init__(self, path: Path, meta: TraceMeta, requests: pd.DataFrame, arrays: dict[str, np.ndarray],
                 embeddings: dict[str, np.ndarray]):
        self.path = path
        self.meta = meta
        self.requests = requests
        self.experts: np.ndarray = arrays[EXPERTS]
        self.prefill_counts: np.ndarray = arrays[PREFILL_COUNTS]
        self.lookahead: np.ndarray | None = arrays.get(LOOKAHEAD)
        self.hidden_proj: np.ndarray | None = arrays.get(HIDDEN_PROJ)
        self._dense = arrays.get(PROBS)
        self._topm_experts = arrays.get(TOPM_EXPERTS)
        self._topm_probs = arrays.get(TOPM_PROBS)
        self._embeddings = embeddings
        self.iter_offset = requests["iter_offset"].to_numpy(np.int64)
        self.prefill_iters = requests["prefill_iters"].to_numpy(np.int64)
        self.decode_iters = requests["decode_iters"].to_numpy(np.int64)
        recorded = meta.prefill_recorded
        self.prefill_recorded: bool = bool(self.prefill_iters.any() or np.asarray(self.prefill_counts).any()) \
            if recorded is None else recorded

    @property
    def probs_known(self) -> str:
        """"full" or "topm": in a topm trace only meta.topm probabilities per (iteration, layer) are known."""
        return self.meta.probs_known

    @property
    def model(self) -> ModelSpec:
        return self.meta.model

    @property
    def source(self) -> Provenance:
        return self.meta.source

    @property
    def num_requests(self) -> int:
        return self.meta.num_requests

    @property
    def num_iterations(self) -> int:
        return self.meta.num_iterations

    def request_fields(self, request: int) -> dict[str, Any]:
        """A request's row as TraceWriter.add_request takes it (missing prompt and arrival as None), for
        tools that copy requests into a new trace."""
        row = self.requests.iloc[request]
        return {"request_id": str(row["request_id"]), "dataset": str(row["dataset"]),
                "prompt": row["prompt"] if isinstance(row["prompt"], str) else None,
                "subject": row["subject"] if isinstance(row["subject"], str) else None,
                "prompt_tokens": int(row["prompt_tokens"]), "output_tokens": int(row["output_tokens"]),
                "arrival_s": None if np.isnan(row["arrival_s"]) else float(row["arrival_s"])}

    def rows(self, request: int) -> tuple[int, int, int]:
        """(first iteration row, prefill iterations, decode iterations) of a request."""
        return int(self.iter_offset[request]), int(self.prefill_iters[request]), int(self.decode_iters[request])

    def probs(self, rows: slice | np.ndarray | int, layer: int | slice = slice(None),
              unknown: float = np.nan) -> np.ndarray:
        """Router probabilities of the given iteration rows, dense, float32; probabilities the trace
        did not record (topm traces) are `unknown`: NaN unless the caller says what it takes them for."""
        if self._dense is not None:
            return np.asarray(self._dense[rows, layer], dtype=np.float32)
        idx = np.asarray(self._topm_experts[rows, layer], dtype=np.intp)
        val = np.asarray(self._topm_probs[rows, layer], dtype=np.float32)
        out = np.full(idx.shape[:-1] + (self.model.num_experts,), unknown, dtype=np.float32)
        np.put_along_axis(out, idx, val, axis=-1)
        return out

    def dense_probs(self, unknown: float = np.nan) -> np.ndarray:
        """All router probabilities [iterations, layers, experts] (memory-mapped when dense)."""
        return self._dense if self._dense is not None else self.probs(slice(None), unknown=unknown)

    @property
    def embedding_names(self) -> list[str]:
        return sorted(self._embeddings)

    def embedding(self, name: str | None = None) -> np.ndarray | None:
        """Prompt embeddings [requests, dim] of the named source (default source if None)."""
        name = name or self.meta.default_embedding
        if name is None:
            return None
        if name not in self._embeddings:
            raise TraceError(f"{self.path}: no prompt embedding '{name}'; this trace has {self.embedding_names or 'none'}")
        return self._embeddings[name]


def _fail(path: Path, problem: str) -> TraceError:
    return TraceError(f"{path}: {problem}")


def _load_array(path: Path, dtype: np.dtype, shape: tuple[int | None, ...]) -> np.ndarray:
    if not path.is_file():
        raise _fail(path, "missing; the trace directory is incomplete, re-create it")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise _fail(path, f"truncated or corrupt ({exc}); re-create the trace") from None
    if array.dtype != dtype:
        raise _fail(path, f"dtype {array.dtype}, expected {np.dtype(dtype)}; re-create the trace with this version's tools")
    if len(array.shape) != len(shape) or any(want is not None and got != want for got, want in zip(array.shape, shape)):
        shown = tuple("?" if s is None else s for s in shape)
        raise _fail(path, f"shape {array.shape}, expected {shown}; the trace is truncated or inconsistent, re-create it")
    return array


def load_trace(path: str | Path) -> Trace:
    """Open and validate a trace directory; any problem raises TraceError naming the file."""
    path = Path(path)
    if not path.is_dir():
        raise TraceError(f"trace '{path}': no such directory; pass trace=PATH to a trace directory "
                         "(python -m traces.convert or traces.synth make one)")
    meta_path = path / META
    if not meta_path.is_file():
        raise _fail(meta_path, "missing; this is not a trace directory")
    meta = TraceMeta.from_json(meta_path.read_text(), str(meta_path))
    model = meta.model
    n, r = meta.num_iterations, meta.num_requests
    layers, experts, k = model.num_layers, model.num_experts, model.top_k

    req_path = path / REQUESTS
    try:
        requests = pq.read_table(req_path).to_pandas()
    except (OSError, pa.ArrowException) as exc:
        raise _fail(req_path, f"unreadable ({exc}); re-create the trace") from None
    missing = [c for c in REQUEST_COLUMNS if c not in requests.columns]
    if missing:
        raise _fail(req_path, f"missing columns {missing}; re-create the trace")
    for column in OPTIONAL_COLUMNS:
        if column not in requests.columns:
            requests[column] = None
    if len(requests) != r:
        raise _fail(req_path, f"{len(requests)} rows, meta.json says {r} requests; the trace is inconsistent")
    lengths = requests["prefill_iters"].to_numpy(np.int64) + requests["decode_iters"].to_numpy(np.int64)
    offsets = requests["iter_offset"].to_numpy(np.int64)
    expected = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if r else np.zeros(0, np.int64)
    if (lengths < 0).any() or not np.array_equal(offsets, expected) or int(lengths.sum()) != n:
        raise _fail(req_path, f"iteration offsets do not tile the {n} iterations; the trace is inconsistent, re-create it")

    arrays: dict[str, np.ndarray] = {
        EXPERTS: _load_array(path / EXPERTS, np.uint16, (n, layers, k)),
        PREFILL_COUNTS: _load_array(path / PREFILL_COUNTS, np.uint32, (r, layers, experts)),
    }
    if meta.probs_layout == "dense":
        arrays[PROBS] = _load_array(path / PROBS, np.float16, (n, layers, experts))
    elif meta.probs_layout == "topm":
        arrays[TOPM_EXPERTS] = _load_array(path / TOPM_EXPERTS, np.uint16, (n, layers, meta.topm))
        arrays[TOPM_PROBS] = _load_array(path / TOPM_PROBS, np.float16, (n, layers, meta.topm))
    else:
        raise _fail(meta_path, f"unknown probs_layout '{meta.probs_layout}' (dense or topm)")
    if meta.lookahead_distance:
        arrays[LOOKAHEAD] = _load_array(path / LOOKAHEAD, np.float16, (n, layers, meta.lookahead_distance, experts))
    if meta.hidden_proj_dim:
        arrays[HIDDEN_PROJ] = _load_array(path / HIDDEN_PROJ, np.float16, (n, layers, meta.hidden_proj_dim))
    if n and int(arrays[EXPERTS].max()) >= experts:
        raise _fail(path / EXPERTS, f"expert id {int(arrays[EXPERTS].max())} out of range for {experts} experts")

    embeddings = {
        name: _load_array(path / EMBEDDINGS_DIR / f"{name}.npy", np.float32, (r, dim))
        for name, dim in meta.embeddings.items()
    }
    return Trace(path, meta, requests, arrays, embeddings)


def _save_array(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


def replace_directory(tmp: Path, final: Path, overwrite: bool) -> None:
    """Move a fully written directory into place; an existing one is replaced only on request."""
    if final.exists():
        if not overwrite:
            shutil.rmtree(tmp)
            raise UserError(f"{final} already exists; choose another output directory or allow overwriting")
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)


def write_directory(out: Path, fill: Callable[[Path], Any], overwrite: bool) -> Path:
    """Build a directory with fill(tmp) under a temporary name, then move it into place: a failure
    or a crash never leaves it half-written."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_directory(tmp, out, overwrite)
    return out


class TraceWriter:
    """Collects requests in memory and writes a trace directory atomically on close().

    Use as a context manager: an exception inside the block leaves nothing behind.
    """

    def __init__(self, out_dir: str | Path, model: ModelSpec, source: Provenance, *,
                 topm: int | None = None, default_embedding: str | None = None, overwrite: bool = False):
        self.out_dir = Path(out_dir)
        self.model = model
        self.source = source
        self.topm = topm
        if topm is not None and not model.top_k <= topm <= model.num_experts:
            raise UserError(f"topm={topm} must lie between top_k {model.top_k} and the {model.num_experts} experts")
        self.default_embedding = default_embedding
        self.overwrite = overwrite
        self._rows: list[dict[str, Any]] = []
        self._experts: list[np.ndarray] = []
        self._probs: list[np.ndarray] = []
        self._topm_idx: list[np.ndarray] = []
        self._counts: list[np.ndarray] = []
        self._embeddings: dict[str, dict[int, np.ndarray]] = {}
        self._lookahead: list[np.ndarray] = []
        self._hidden: list[np.ndarray] = []
        self._iterations = 0

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()

    @property
    def num_requests(self) -> int:
        return len(self._rows)

    def add_request(self, *, request_id: str, dataset: str, probs: np.ndarray, prefill_iters: int = 0,
                    prompt: str | None = None, subject: str | None = None, prompt_tokens: int | None = None, output_tokens: int | None = None,
                    arrival_s: float | None = None, experts: np.ndarray | None = None,
                    prefill_counts: np.ndarray | None = None, embeddings: dict[str, np.ndarray] | None = None,
                    lookahead: np.ndarray | None = None, hidden_proj: np.ndarray | None = None) -> None:
        """Add one request's iterations: probs [iterations, layers, experts], prefill rows first; NaN
        marks an unknown probability (allowed in a topm trace only, below the m known ones)."""
        m = self.model
        probs = np.asarray(probs, dtype=np.float32)
        where = f"request '{request_id}'"
        if self.topm is None and np.isnan(probs).any():
            raise UserError(f"{where}: probabilities with unknown (NaN) entries need a topm trace "
                            "(TraceWriter(topm=...)): a dense trace records every probability")
        if probs.ndim != 3 or probs.shape[1:] != (m.num_layers, m.num_experts):
            raise UserError(f"{where}: probs shape {probs.shape}, expected (iterations, {m.num_layers}, {m.num_experts})")
        n = probs.shape[0]
        if not 0 <= prefill_iters <= n:
            raise UserError(f"{where}: prefill_iters {prefill_iters} outside 0..{n}")
        experts = top_k_experts(probs, m.top_k) if experts is None else np.asarray(experts, dtype=np.uint16)
        if experts.shape != (n, m.num_layers, m.top_k):
            raise UserError(f"{where}: experts shape {experts.shape}, expected ({n}, {m.num_layers}, {m.top_k})")
        if prefill_counts is None:
            prefill_counts = tally_experts(experts[:prefill_iters], m.num_experts)
        prefill_counts = np.asarray(prefill_counts, dtype=np.uint32)
        if prefill_counts.shape != (m.num_layers, m.num_experts):
            raise UserError(f"{where}: prefill_counts shape {prefill_counts.shape}, expected ({m.num_layers}, {m.num_experts})")
        extras = []
        for name, array, store in (("lookahead", lookahead, self._lookahead), ("hidden_proj", hidden_proj, self._hidden)):
            if self._rows and bool(store) != (array is not None):
                raise UserError(f"{where}: {name} given for some requests and not others; give it for all or none")
            if array is not None:
                array = np.asarray(array, dtype=np.float16)
                if array.shape[:2] != (n, m.num_layers):
                    raise UserError(f"{where}: {name} shape {array.shape} does not start with ({n}, {m.num_layers})")
                if store and store[0].shape[2:] != array.shape[2:]:
                    raise UserError(f"{where}: {name} shape {array.shape} differs from earlier requests' {store[0].shape}")
                extras.append((store, array))
        vectors = {name: np.asarray(v, dtype=np.float32).ravel() for name, v in (embeddings or {}).items()}
        for name, vector in vectors.items():
            known = self._embeddings.get(name)
            if known and next(iter(known.values())).shape != vector.shape:
                raise UserError(f"{where}: embedding '{name}' has {vector.size} dims, earlier requests had "
                                f"{next(iter(known.values())).size}")

        if self.topm is not None:
            idx = np.argsort(-probs, axis=-1, kind="stable")[..., : self.topm]  # NaN (unknown) sorts last
            kept = np.take_along_axis(probs, idx, axis=-1)
            if np.isnan(kept).any():
                raise UserError(f"{where}: topm={self.topm} keeps probabilities the source did not record "
                                "(unknown); choose a topm no larger than the source's")

        # Everything is valid: only now change the writer's state.
        index = len(self._rows)
        for store, array in extras:
            store.append(array)
        for name, vector in vectors.items():
            self._embeddings.setdefault(name, {})[index] = vector

        if self.topm is None:
            self._probs.append(probs.astype(np.float16))
        else:
            self._topm_idx.append(idx.astype(np.uint16))
            self._probs.append(kept.astype(np.float16))
        self._experts.append(experts)
        self._counts.append(prefill_counts)
        self._rows.append({
            "request_id": str(request_id),
            "dataset": dataset,
            "prompt": prompt,
            "subject": subject,
            "prompt_tokens": prefill_iters if prompt_tokens is None else int(prompt_tokens),
            "output_tokens": (n - prefill_iters + (1 if prefill_iters else 0)) if output_tokens is None else int(output_tokens),
            "arrival_s": np.nan if arrival_s is None else float(arrival_s),
            "iter_offset": self._iterations,
            "prefill_iters": prefill_iters,
            "decode_iters": n - prefill_iters,
        })
        self._iterations += n

    def close(self, realism: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> Path:
        """Write the trace; its realism figures are computed (traces.stats) unless given."""
        if not self._rows:
            raise UserError(f"{self.out_dir}: no requests were added; nothing to write")
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out_dir.with_name(f".{self.out_dir.name}.tmp-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            self._write(tmp, realism or {}, extra or {})
            if realism is None:
                from traces.stats import annotate  # stats reads traces: imported here, not at the top

                annotate(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        replace_directory(tmp, self.out_dir, self.overwrite)
        return self.out_dir

    def _write(self, tmp: Path, realism: dict[str, Any], extra: dict[str, Any]) -> None:
        m = self.model
        r = len(self._rows)
        table = pa.Table.from_pylist(self._rows, schema=pa.schema(list((REQUEST_COLUMNS | OPTIONAL_COLUMNS).items())))
        pq.write_table(table, tmp / REQUESTS)
        _save_array(tmp / EXPERTS, np.concatenate(self._experts))
        _save_array(tmp / PREFILL_COUNTS, np.stack(self._counts))
        if self.topm is None:
            _save_array(tmp / PROBS, np.concatenate(self._probs))
        else:
            _save_array(tmp / TOPM_EXPERTS, np.concatenate(self._topm_idx))
            _save_array(tmp / TOPM_PROBS, np.concatenate(self._probs))
        if self._lookahead:
            _save_array(tmp / LOOKAHEAD, np.concatenate(self._lookahead))
        if self._hidden:
            _save_array(tmp / HIDDEN_PROJ, np.concatenate(self._hidden))
        dims = {}
        if self._embeddings:
            (tmp / EMBEDDINGS_DIR).mkdir()
        for name, per_request in self._embeddings.items():
            dim = next(iter(per_request.values())).size
            matrix = np.full((r, dim), np.nan, dtype=np.float32)
            for index, vector in per_request.items():
                matrix[index] = vector
            _save_array(tmp / EMBEDDINGS_DIR / f"{name}.npy", matrix)
            dims[name] = dim
        default = self.default_embedding or (sorted(dims)[0] if dims else None)
        if default is not None and default not in dims:
            raise UserError(f"default embedding '{default}' was never given; known: {sorted(dims)}")
        meta = TraceMeta(
            format_version=FORMAT_VERSION,
            model=m,
            source=self.source,
            num_requests=r,
            num_iterations=self._iterations,
            probs_layout="dense" if self.topm is None else "topm",
            topm=self.topm or 0,
            embeddings=dims,
            default_embedding=default,
            lookahead_distance=self._lookahead[0].shape[2] if self._lookahead else 0,
            hidden_proj_dim=self._hidden[0].shape[2] if self._hidden else 0,
            realism=realism,
            extra=extra,
            probs_known="full" if self.topm is None else "topm",
            prefill_recorded=bool(any(row["prefill_iters"] for row in self._rows)
                                  or any(c.any() for c in self._counts)),
        )
        (tmp / META).write_text(meta.to_json())
