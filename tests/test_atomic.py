"""A writer killed outright leaves its temporary; the next writer into the folder removes it."""
import subprocess
import sys

from conftest import repo_env, tiny_model, write_trace
from traces.atomic import HOST, atomic_write_text, temporary

KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from traces.format import write_directory

def fill(tmp):
    (tmp / "half.npy").write_bytes(b"x" * 1000)
    os.kill(os.getpid(), signal.SIGKILL)  # killed mid-write, as the OOM killer does

write_directory(Path(sys.argv[1]), fill, overwrite=True)
"""


def test_the_temporary_of_a_killed_trace_writer_is_removed_by_the_next_write(tmp_path):
    out = tmp_path / "trace"
    done = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out)], env=repo_env(), timeout=120)
    assert done.returncode == -9
    leftovers = list(tmp_path.glob(".trace.tmp-*"))
    assert len(leftovers) == 1 and (leftovers[0] / "half.npy").is_file()  # what the issue saw
    live = temporary(tmp_path / "other")  # a writer still running (this process) keeps its temporary
    live.mkdir()
    write_trace(out, tiny_model(), [[[[0]], [[1]]]])
    assert (out / "meta.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [live.name]


def test_a_file_writer_removes_dead_writers_temporaries_too(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".metrics.json.tmp-{dead.pid}.{HOST}"
    stale.write_text("{half")
    elsewhere = tmp_path / f".metrics.json.tmp-{dead.pid}.another-host"  # a shared filesystem's: left alone
    elsewhere.write_text("{half")
    atomic_write_text(tmp_path / "metrics.json", "{}")
    assert not stale.exists() and elsewhere.exists() and (tmp_path / "metrics.json").read_text() == "{}"
