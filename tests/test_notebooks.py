"""The notebooks: every one in notebooks/ runs top to bottom (so none can rot), each module the
design pairs with a notebook has one, and notebooks are stored without outputs."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 300

# notebook -> the modules it teaches; a notebook is required once any of them exists.
PAIRS = {
    "01_llama": ("model.py", "rope.py"),
    "02_kv_cache": ("kv_cache.py", "device_memory.py"),
    "03_cpu_attention": ("cpu_attention.py", "compile_fallback.py"),
    "04_overlap": ("streams.py", "runner.py", "cpu_worker.py", "bench_overlap.py"),
    "05_profiler_predictor": ("profiler.py", "predictor.py", "feedback.py"),
    "06_scheduler": ("scheduler.py",),
    "07_benchmarks": ("bench.py",),
    "08_decode_fast_path": ("decode_step.py", "packed_linear.py", "packed_model.py", "cuda_graphs.py"),
}


def _source(path: Path) -> str:
    import nbformat

    nb = nbformat.read(path, as_version=4)
    return "\n".join(cell.source for cell in nb.cells)


@pytest.mark.parametrize("name, modules", sorted(PAIRS.items()), ids=sorted(PAIRS))
def test_paired_modules_have_notebooks(name, modules):
    present = [m for m in modules if (ROOT / "apex_mini" / m).exists()]
    if not present:
        pytest.skip(f"none of {', '.join(modules)} exists yet")
    assert (NOTEBOOK_DIR / f"{name}.ipynb").exists(), \
        f"apex_mini/{present[0]} has no notebook; add notebooks/{name}.ipynb"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_valid_and_saved_without_outputs(path):
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    # A cell without an id: nbformat adds one as it reads (with a warning) but will refuse it
    # in a later release, so the file itself is checked.
    ids = [cell.get("id") for cell in json.loads(path.read_text())["cells"]]
    assert None not in ids, f"{path.name} cell {ids.index(None)} has no id"
    assert len(set(ids)) == len(ids), f"{path.name} has cells sharing an id"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, \
                f"{path.name} cell {i} was saved with outputs; clear them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_reads_no_scratch_folder(path):
    """Notebooks load the shipped model (config.DEFAULT_MODEL_DIR), never a path that exists
    only on the machine that wrote them."""
    assert "/tmp/" not in _source(path), f"{path.name} names a /tmp path"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch, tmp_path):
    """Execute every cell in a fresh python3 kernel, with notebooks/ as the working directory
    and a private profile cache (a user's cached profiles are neither read nor written). A
    notebook removes the temporary files it makes."""
    import getpass
    import tempfile

    import nbformat
    from nbclient import NotebookClient

    # The kernel inherits this environment: import apex_mini from this checkout even when it
    # is not installed, and skip torch.compile's cost unless the notebook sets it itself.
    monkeypatch.setenv("APEX_MINI_CACHE", str(tmp_path / "cache"))
    scratch = tmp_path / "tmp"                       # the kernel's temporary folder
    scratch.mkdir()
    # (Inductor keeps its compiled code in the usual place, shared with other runs.)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", os.environ.get(
        "TORCHINDUCTOR_CACHE_DIR",
        os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}")))
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if "APEX_MINI_EAGER_CPU_ATTENTION" not in _source(path):
        monkeypatch.setenv("APEX_MINI_EAGER_CPU_ATTENTION", "1")
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()
    # (Inductor also keeps some of its caches, precompiled headers, under the temporary folder.)
    left = [p.name for p in scratch.iterdir() if not p.name.startswith("torchinductor_")]
    assert not left, f"{path.name} left temporary files behind: {left}"
