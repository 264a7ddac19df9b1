"""docs/tutorial.ipynb runs top to bottom in a fresh kernel (nbclient), and is kept without outputs."""
from __future__ import annotations

import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent.parent / "docs" / "tutorial.ipynb"


def test_the_repository_keeps_the_notebook_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) >= 10
    assert all(c.outputs == [] and c.execution_count is None for c in code)


def test_the_tutorial_runs_top_to_bottom(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    elapsed = time.perf_counter() - start
    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    figures = [c for c in code if any("image/png" in o.get("data", {}) for o in c.outputs)]
    assert len(figures) >= 5  # probe (entropy, CKA), attention maps, Hessian, reliability: drawn inline
    tables = [c for c in code if any("text/html" in o.get("data", {}) for o in c.outputs)]
    assert len(tables) >= 3  # DataFrames
    assert "report.html" in "".join(o.get("text", "") for o in code[-1].outputs)
    print(f"tutorial executed in {elapsed:.1f} s")
