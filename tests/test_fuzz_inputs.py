"""Bad input to every user-facing command: status 2, an 'error:' line naming the problem, no
traceback, and no output left behind. Prints how many inputs were tried and how many passed.

The commands run in this process (their main functions; `python -m sim` through runpy, exactly as
-m runs it), which takes seconds instead of minutes; a few cases run as real processes to pin what
only a process shows (the exit status the shell sees, nothing else on stderr)."""
import contextlib
import io
import json
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import repo_env

REPO = Path(__file__).resolve().parents[1]
REAL = REPO / "traces" / "data" / "mixtral-8x7b-gsm8k"


def damaged_traces(root: Path) -> dict[str, Path]:
    """Copies of a shipped trace, each broken one way."""
    def copy(name):
        dst = root / name
        shutil.copytree(REAL, dst)
        return dst
    made = {}
    t = copy("truncated"); data = (t / "experts.npy").read_bytes(); (t / "experts.npy").write_bytes(data[: len(data) // 2])
    made["truncated experts.npy"] = t
    t = copy("missing"); (t / "experts.npy").unlink(); made["missing experts.npy"] = t
    t = copy("dtype")
    np.save(t / "experts.npy", np.load(REAL / "experts.npy").astype(np.float32)); made["wrong dtype"] = t
    t = copy("shape"); np.save(t / "experts.npy", np.load(REAL / "experts.npy")[:, :3]); made["wrong shape"] = t
    t = copy("parquet"); (t / "requests.parquet").write_bytes(b"PAR1 not really parquet"); made["corrupt parquet"] = t
    t = copy("meta"); (t / "meta.json").write_text('{"format_version": 1, '); made["malformed meta.json"] = t
    made["no such trace"] = root / "nowhere"
    return made


def in_process(main, argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
            code = 0
        except SystemExit as exc:
            code = exc.code
        except Exception as exc:  # noqa: BLE001 - a traceback is what the test reports
            code, err = "traceback", io.StringIO(f"Traceback: {exc!r}")
    return code, err.getvalue()


def run_sim_module(argv):
    """`python -m sim ARGS` in this process: sim/__main__.py run as -m runs it."""
    saved = sys.argv
    sys.argv = ["sim", *argv]
    try:
        runpy.run_module("sim", run_name="__main__", alter_sys=True)
    finally:
        sys.argv = saved


def shown_lines(stderr: str) -> list[str]:
    """The lines a terminal shows at the end: a progress bar that redraws itself with \\r and is then
    cleared leaves nothing."""
    return [shown for line in stderr.split("\n") if (shown := line.rsplit("\r", 1)[-1]).strip()]


def judge(code, stderr, out: Path | None) -> str | None:
    """None where the command refused the input as it should (one line, 'error: ...', status 2, no
    output left behind), else what went wrong."""
    lines = shown_lines(stderr)
    if code != 2:
        return f"status {code}"
    if "Traceback" in stderr:
        return "traceback"
    if not lines or "error:" not in lines[-1]:
        return "no error line"
    if out is not None and out.exists() and any(out.rglob("*")):
        return "left output"
    if len(lines) != 1:
        return "more than one line"
    return None


def test_bad_inputs_get_one_error_line_and_leave_nothing(tmp_path, capsys):
    from realrun.compare import main as compare
    from sim.reproduce import main as reproduce
    from sim.results import main as results
    from traces.compact import main as compact
    from traces.convert import main as convert
    from traces.stats import main as stats
    from traces.synth import main as synth

    traces = damaged_traces(tmp_path / "traces")
    out = tmp_path / "out"
    bad_jsonl = tmp_path / "bad.jsonl"; bad_jsonl.write_text('{"experts": [1, 2], "gating_probs": [0.5\n')
    wrong_jsonl = tmp_path / "wrong.jsonl"; wrong_jsonl.write_text(json.dumps({"experts": "x"}) + "\n")
    bad_run = tmp_path / "sweep" / "run"; bad_run.mkdir(parents=True)
    (bad_run / "metrics.json").write_text("{not json"); (bad_run / "run_config.json").write_text("{}")
    cases = []  # (label, command, argv, output dir that must stay empty)
    for what, path in traces.items():
        cases += [(f"traces.stats {what}", stats, [str(path)], None),
                  (f"traces.synth {what}", synth, ["--fit", str(path), str(out), "--requests", "2"], out),
                  (f"realrun.compare {what}", compare, ["--trace", str(path), "--device", "cpu", "--out", str(out)], out)]
    cases += [
        ("traces.convert malformed JSON line", convert, ["topk-jsonl", str(bad_jsonl), str(out), "--model", "mixtral-8x7b"], out),
        ("traces.convert wrong field type", convert, ["topk-jsonl", str(wrong_jsonl), str(out), "--model", "mixtral-8x7b"], out),
        ("traces.convert missing file", convert, ["topk-jsonl", str(tmp_path / "none.jsonl"), str(out), "--model", "mixtral-8x7b"], out),
        ("traces.convert unknown model", convert, ["topk-jsonl", str(bad_jsonl), str(out), "--model", "nope"], out),
        ("traces.convert unknown format", convert, ["nope", str(bad_jsonl), str(out)], out),
        ("traces.synth --requests 0", synth, ["--fit", str(REAL), str(out), "--requests", "0"], out),
        ("traces.synth --requests abc", synth, ["--fit", str(REAL), str(out), "--requests", "abc"], out),
        ("traces.stats unknown trace name", stats, ["no-such-trace"], None),
        ("traces.stats unknown flag", stats, [str(REAL), "--slot", "4"], None),
        ("traces.compact --requests 0", compact, [str(REAL), str(out), "--requests", "0"], out),
        ("traces.compact --topm abc", compact, [str(REAL), str(out), "--topm", "abc"], out),
        ("traces.compact missing OUT_DIR", compact, [str(REAL)], None),
        ("traces.stats --slots -1", stats, [str(REAL), "--slots", "-1"], None),
        ("sim.results missing dir", results, [str(tmp_path / "none")], None),
        ("sim.results damaged metrics.json", results, [str(tmp_path / "sweep"), "--out", str(out)], out),
        ("sim.reproduce unknown policy", reproduce, ["--policies", "nope", "--out", str(out)], out),
        ("sim.reproduce budget 0GB", reproduce, ["--budgets", "0GB", "--out", str(out)], out),
        ("sim.reproduce budget -1GB", reproduce, ["--budgets", "-1GB", "--out", str(out)], out),
        ("sim.reproduce budget 1.5experts", reproduce, ["--budgets", "1.5experts", "--out", str(out)], out),
        ("sim.reproduce unknown hardware", reproduce, ["--hardware", "nope", "--out", str(out)], out),
        ("sim.reproduce unknown trace", reproduce, ["--traces", "nope", "--out", str(out)], out),
        ("realrun.compare unknown policy", compare, ["--policies", "nope", "--device", "cpu", "--out", str(out)], out),
        ("realrun.compare budget 1.5experts", compare, ["--budgets", "1.5experts", "--device", "cpu", "--out", str(out)], out),
        ("realrun.compare budget 1e30GB", compare, ["--budgets", "1e30GB", "--device", "cpu", "--out", str(out)], out),
        ("realrun.compare --max-requests 0", compare, ["--max-requests", "0", "--device", "cpu", "--out", str(out)], out),
    ]
    failed = {}
    for label, main, argv, must_stay_empty in cases:
        code, stderr = in_process(main, argv)
        problem = judge(code, stderr, must_stay_empty)
        if problem:
            failed[label] = f"{problem}: {stderr.strip().splitlines()[-1:] }"
        if out.exists():
            shutil.rmtree(out)

    sim_cases = [["+budget=0GB"], ["+budget=-1GB"], ["+budget=1e30GB"], ["+budget=1.5experts"], ["rate_rps=0"],
                 ["max_requests=0"], ["seed=abc"], ["+policy=lru", "policy.scope=3"], ["+policy=finemoe", "policy.distance=far"],
                 ["hardware=nope"], ["nokey=1"], *([f"trace={path}"] for path in traces.values())]

    def sim_argv(args, run_dir):
        last = "seed=0" if any(a.startswith("max_requests") for a in args) else "max_requests=1"
        return [*args, f"hydra.run.dir={run_dir}", "progress=false", last]

    for n, args in enumerate(sim_cases):
        run_dir = tmp_path / "sim" / str(n)
        code, stderr = in_process(run_sim_module, sim_argv(args, run_dir))
        problem = judge(code, stderr, run_dir)
        if problem:
            failed[f"sim {' '.join(args)}"] = f"{problem}: {stderr.strip().splitlines()[-1:]}"

    # As real processes: Hydra's entry point, and argparse's refusing a value and the work refusing its input.
    processes = [(["sim", *sim_argv(["+budget=-1GB"], tmp_path / "proc" / "sim")], tmp_path / "proc" / "sim"),
                 (["sim.reproduce", "--budgets", "1e30GB", "--out", str(out)], out),
                 (["traces.compact", str(REAL), str(out), "--decode-iters", "many"], out),
                 (["traces.stats", str(traces["corrupt parquet"])], None)]
    for argv, must_stay_empty in processes:
        done = subprocess.run([sys.executable, "-m", *argv], check=False, cwd=tmp_path, capture_output=True, text=True,
                              timeout=120, env=repo_env())
        problem = judge(done.returncode, done.stderr, must_stay_empty)
        if problem:
            failed[f"process: python -m {' '.join(argv[:3])}"] = f"{problem}: {done.stderr.strip().splitlines()[-1:]}"
    tried = len(cases) + len(sim_cases) + len(processes)
    with capsys.disabled():
        print(f"\nfuzz: {tried} bad inputs tried, {tried - len(failed)} passed")
        for label, problem in failed.items():
            print(f"  FAILED {label}: {problem}")
    assert not failed
