"""The notebooks' code cells run top to bottom (they use the tiny teacher, no download)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path):
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    assert cells
    scope: dict = {}
    for cell in cells:
        exec(compile("".join(cell["source"]), f"{path.name}", "exec"), scope)
    # the last cell prints the parity of the merged model; recompute it here
    diff = (scope["student"](scope["ids"]).logits - scope["clone"](scope["ids"]).student_logits).abs().max()
    assert diff.item() < 1e-4
    assert scope["after"] < scope["terms"]["loss"].item()
