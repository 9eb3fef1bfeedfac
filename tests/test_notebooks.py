"""Executes notebooks/*.ipynb top to bottom, offline, with this interpreter's kernel (nbclient).

What it checks
    * every notebook is valid nbformat v4, stored WITHOUT outputs (small diffs), and asks for the
      ``python3`` kernel;
    * executed in a fresh kernel (cwd = notebooks/, HF_HUB_OFFLINE=1), no cell raises, and each notebook
      draws at least one figure (an ``image/png`` output);
    * the kernel really is this venv's interpreter: a kernelspec named ``python3`` is written by
      ``ipykernel.kernelspec.install(prefix=tmp)`` (argv[0] = ``sys.executable``) into a temporary folder put
      first on JUPYTER_PATH (nothing is registered globally), and a probe cell appended in memory reports
      ``sys.executable`` / ``sys.prefix`` from inside the kernel.

The three notebooks together take well over a minute on the shared 2-core machine (tiny diffusion
model, offline Real-ESRGAN on a 32x32 input, NIQE), hence ``slow``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = {"01_walkthrough.ipynb", "02_fidelity_realism.ipynb", "03_results.ipynb"}
CELL_TIMEOUT_S = 600  # per cell; the shared CPU can be 5x slower than an idle one
PROBE = "import json, sys\nprint('KERNEL_PROBE ' + json.dumps({'executable': sys.executable, 'prefix': sys.prefix}))"


def test_expected_notebooks_exist():
    assert EXPECTED <= {p.name for p in NOTEBOOKS}, f"missing notebooks: {EXPECTED - {p.name for p in NOTEBOOKS}}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_stored_clean(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{path.name} has no code cells"
    dirty = [i for i, c in enumerate(code) if c.get("outputs") or c.get("execution_count") is not None]
    assert not dirty, f"{path.name}: code cells {dirty} are stored with outputs; clear them before committing"
    text = "\n".join(c.source for c in nb.cells)
    assert "/work/shared" not in text and "../shared" not in text, f"{path.name} must not need the shared folder"


@pytest.fixture(scope="module")
def venv_kernel(tmp_path_factory):
    """JUPYTER_PATH starts with a temporary folder holding a ``python3`` kernelspec for THIS interpreter."""
    from ipykernel.kernelspec import install

    prefix = tmp_path_factory.mktemp("kernel")
    with pytest.MonkeyPatch.context() as mp:
        first = str(prefix / "share" / "jupyter")
        mp.setenv("JUPYTER_PATH", os.pathsep.join([first, os.environ.get("JUPYTER_PATH", "")]))
        spec_dir = Path(install(prefix=str(prefix), kernel_name="python3"))
        argv = json.loads((spec_dir / "kernel.json").read_text())["argv"]
        assert argv[0] == sys.executable, argv
        yield spec_dir


def _png_outputs(nb) -> int:
    return sum(
        1 for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if "image/png" in o.get("data", {})
    )


def _errors(nb) -> list[str]:
    return [
        f"{o.get('ename')}: {o.get('evalue')}"
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, venv_kernel, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # let ipykernel pick the inline backend
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(PROBE))
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        allow_errors=False,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    t0 = time.perf_counter()
    client.execute()  # raises CellExecutionError naming the failing cell
    elapsed = time.perf_counter() - t0
    print(f"{path.name}: executed in {elapsed:.1f} s")

    assert not _errors(nb), _errors(nb)
    assert _png_outputs(nb) >= 1, f"{path.name} drew no figure"
    probe = [o["text"] for o in nb.cells[-1].outputs if o.get("name") == "stdout"]
    assert probe and probe[0].startswith("KERNEL_PROBE "), probe
    seen = json.loads(probe[0].split(" ", 1)[1])
    assert seen["executable"] == sys.executable, f"kernel ran {seen['executable']}, expected {sys.executable}"
    assert seen["prefix"] == sys.prefix, f"kernel prefix {seen['prefix']}, expected {sys.prefix}"
