"""The table of training attempts: each run's recipe, loss and routing realism beside the real figures.

    python -m traces.standin.attempts RUN_DIR [RUN_DIR ...]      # markdown table of the runs found
    python -m traces.standin.attempts RUN_DIR ... --best SHAPE    # the run of SHAPE closest to real routing

A RUN_DIR is a traces.standin.train output or a folder of them.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pandas as pd

from traces.cli import ArgumentParser, run_cli
from traces.errors import UserError

# ../shared/docs/routing-realism.md: real Mixtral-8x7B-Instruct decode, 4 sequences, 577 tokens.
REAL_MIXTRAL = {"run": "real Mixtral-8x7B-Instruct (routing-realism.md)", "shape": "mixtral-8x7b",
                "token_reuse_pct": 37.5, "lru_2_4_6_slots_pct": "37.3 / 61.4 / 81.8", "belady_4_slots_pct": 74.5,
                "request_entropy_bits": 2.90}


def find_runs(paths: list[str]) -> list[Path]:
    runs = []
    for path in map(Path, paths):
        runs += [path] if (path / "summary.json").is_file() else sorted(p.parent for p in path.glob("*/summary.json"))
    if not runs:
        raise UserError(f"no training runs (summary.json) in {', '.join(paths)}; pass traces.standin.train outputs")
    return runs


def recipe(settings: dict[str, Any]) -> str:
    return (f"lr {settings['lr']:g}, ctx {settings['context']}, aux {settings['aux_loss']:g}/{settings['aux_scope']}, "
            f"dropout {settings['dropout']:g}, router {settings['router_input']}")


def run_row(run: Path) -> dict[str, Any]:
    summary = json.loads((run / "summary.json").read_text())
    realism, settings = summary["realism"], summary["settings"]
    lru, belady = realism["lru_hit_rate"], realism["belady_hit_rate"]
    middle = sorted(belady, key=int)[len(belady) // 2]
    return {
        "run": run.name, "shape": settings["shape"], "recipe": recipe(settings), "steps": summary["steps_done"],
        "tokens_M": round(summary["tokens_seen"] / 1e6, 1), "train_loss_nats": round(summary["final_train_loss_nats"], 2),
        "heldout_ppl": round(summary["heldout_perplexity"], 1), "token_reuse_pct": round(100 * realism["token_reuse"], 1),
        "lru_" + "_".join(sorted(lru, key=int)) + "_slots_pct": " / ".join(f"{100 * lru[s]:.1f}" for s in sorted(lru, key=int)),
        f"belady_{middle}_slots_pct": round(100 * belady[middle], 1),
        "request_entropy_bits": round(realism["request_entropy_bits"], 2),
        "distance_to_real": None if realism.get("distance_to_real") is None else round(realism["distance_to_real"], 3),
    }


def attempts_table(runs: list[Path]) -> pd.DataFrame:
    rows = [run_row(run) for run in runs]
    if any(row["shape"] == REAL_MIXTRAL["shape"] for row in rows):
        rows.append(REAL_MIXTRAL)
    return pd.DataFrame(rows)


def best_run(runs: list[Path], shape: str) -> Path:
    """The run of `shape` with the smallest distance to real routing (the lowest token reuse where none has one)."""
    rows = [(run, run_row(run)) for run in runs]
    candidates = [(run, row) for run, row in rows if row["shape"] == shape]
    if not candidates:
        raise UserError(f"no run of shape {shape} among {', '.join(r.name for r in runs)}")
    return min(candidates, key=lambda c: (c[1]["distance_to_real"] is None, c[1]["distance_to_real"] or 0,
                                          c[1]["token_reuse_pct"]))[0]


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m traces.standin.attempts", description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--best", metavar="SHAPE", help="print only the path of the run of SHAPE closest to real")

    def work() -> None:
        args = parser.parse_args(argv)
        runs = find_runs(args.runs)
        if args.best:
            print(best_run(runs, args.best))
        else:
            table = attempts_table(runs)
            for shape, rows in table.groupby("shape", sort=False):
                print(f"\n### {shape}\n\n" + rows.dropna(axis=1, how="all").to_markdown(index=False))

    run_cli(work)


if __name__ == "__main__":
    main()
