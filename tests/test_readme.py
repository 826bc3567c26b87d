"""The README's Python example runs as written (from the repository root, on the shipped zoo model)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) == 1
    if not (ROOT / "zoo" / "A" / "seed0" / "h4" / "meta.json").exists():
        pytest.fail("the README example needs zoo/A/seed0/h4")
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        exec(compile(blocks[0], "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    assert "torch.Size([500, 4, 41, 41])" in out and "pruned, mean-ablated/full risk at n = d:" in out
