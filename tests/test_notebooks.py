"""Every notebook in notebooks/ is stored without outputs and runs headless on a small sweep.

Notebooks receive papermill parameters (notebooks/README.md): sweep_dir, a finished sweep's
directory, and trace, the trace directory that sweep replayed. A failing cell fails the test.
"""
from pathlib import Path

import nbformat
import papermill
import pytest

from traces.defaults import resolve_trace

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
REQUIRED = {"hit_rate_curves", "latency_vs_budget"}


def test_the_analysis_notebooks_are_there():
    assert REQUIRED <= {path.stem for path in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: clear its outputs"


def run_notebook(path: Path, out: Path, sweep_dir: Path) -> nbformat.NotebookNode:
    """Execute a notebook in a fresh kernel, from the repository's root; raises on the first failing cell."""
    return papermill.execute_notebook(
        str(path), str(out), cwd=str(REPO), progress_bar=False, kernel_name="python3",
        parameters={"sweep_dir": str(sweep_dir), "trace": str(resolve_trace("default"))})


def test_a_failing_cell_fails_the_run(tmp_path):
    kernel = {"name": "python3", "display_name": "Python 3", "language": "python"}
    broken = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("raise ValueError('broken cell')")],
                                      metadata={"kernelspec": kernel})
    nbformat.write(broken, tmp_path / "broken.ipynb")
    with pytest.raises(papermill.PapermillExecutionError, match="broken cell"):
        run_notebook(tmp_path / "broken.ipynb", tmp_path / "out.ipynb", tmp_path)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_headless(path, small_sweep, tmp_path):
    executed = run_notebook(path, tmp_path / path.name, small_sweep)
    figures = [output for cell in executed.cells for output in cell.get("outputs", [])
               if "image/png" in output.get("data", {})]
    assert figures, f"{path.name} drew no figure"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_notebook_takes_its_inputs_as_papermill_parameters(path):
    notebook = nbformat.read(path, as_version=4)
    tagged = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: one cell tagged 'parameters' (notebooks/README.md)"
    defined = {line.split("=")[0].strip() for line in tagged[0].source.splitlines() if "=" in line}
    assert defined & {"sweep_dir", "trace"}, f"{path.name}: its parameters cell defines neither sweep_dir nor trace"


def test_the_routing_entropy_notebook_draws_the_trace_it_is_given(tmp_path):
    path = REPO / "notebooks" / "routing_entropy.ipynb"
    given = resolve_trace("standin/qwen1.5-moe-sharegpt")
    executed = papermill.execute_notebook(str(path), str(tmp_path / "out.ipynb"), cwd=str(REPO), progress_bar=False,
                                          kernel_name="python3", parameters={"trace": str(given)})
    printed = "".join(o.get("text", "") for cell in executed.cells for o in cell.get("outputs", []))
    assert f"{given.name}: 160 requests" in printed
