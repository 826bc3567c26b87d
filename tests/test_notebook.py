"""The example notebook runs top to bottom without a cell error on the zoo model (a few seconds), prints
E2 and E3 for every ablation kind and shows the library's Figures inline."""

from __future__ import annotations

import os
from pathlib import Path

import nbclient
import nbformat
import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "head_analysis.ipynb"


@pytest.mark.slow  # end-to-end
def test_head_analysis_notebook_executes(tmp_path, monkeypatch):
    src = str(Path(__file__).resolve().parents[1] / "src")  # the kernel imports this checkout's package
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    for kind in ("zero", "mean", "resample"):
        assert f"{kind:>8}: top-head share layer 1: head" in text  # E2
        line = next(ln for ln in text.splitlines() if ln.startswith(f"{kind:>8}: kept"))  # E3
        assert line.startswith(f"{kind:>8}: kept [[1, 1, 1, 1], ") and "own read-out" in line
        assert "control" in line and "last-layer probe" in line
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(figures) == 3  # E2 importance, E2 attention, E4 probes: returned Figures shown inline
    assert all(o["output_type"] == "execute_result" and o["data"]["text/plain"].startswith("<Figure") for o in figures)
