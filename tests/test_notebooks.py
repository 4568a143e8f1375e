"""The notebooks run top to bottom so they never rot: the quickstart's code cells in this process
(tiny teacher, no download), and the analysis notebooks executed by a Jupyter kernel (nbclient) on
a tiny-teacher run made here with lrc-distill, its directory passed as ``LRC_NOTEBOOK_RUN``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from test_cli import compose_cfg, tiny_overrides, write_corpus

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
#: the notebooks that analyse a run (their parameters cell reads LRC_NOTEBOOK_RUN)
ANALYSES = ("training_curves", "projection_analysis", "neuron_masking")


def test_quickstart_runs():
    path = NOTEBOOK_DIR / "quickstart.ipynb"
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    assert cells
    scope: dict = {}
    for cell in cells:
        exec(compile("".join(cell["source"]), f"{path.name}", "exec"), scope)
    # the last cell prints the parity of the merged model; recompute it here
    diff = (scope["student"](scope["ids"]).logits - scope["clone"](scope["ids"]).student_logits).abs().max()
    assert diff.item() < 1e-4
    assert scope["after"] < scope["terms"]["loss"].item()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A finished lrc-distill run on the tiny teacher with what the analyses read: csv logs with
    per-layer terms at every step, a checkpoint at every step, the exported student."""
    from lrc.cli.distill import run

    folder = tmp_path_factory.mktemp("notebook_run")
    corpus = write_corpus(folder / "corpus.jsonl")
    out = folder / "run"
    run(compose_cfg(tiny_overrides(corpus, out, "trainer.max_steps=3", "callbacks.checkpoint.every_n_train_steps=1",
                                   "callbacks.checkpoint.save_top_k=-1", "log.per_layer_every_n_steps=1",
                                   "validate_before=false", "summary.max_new_tokens=1")))
    return out


def test_analysis_notebooks_are_parametrised_and_saved_with_outputs():
    for name in ANALYSES:
        nb = json.loads((NOTEBOOK_DIR / f"{name}.ipynb").read_text())
        params = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(params) == 1 and "LRC_NOTEBOOK_RUN" in "".join(params[0]["source"]), name
        # committed with the outputs of the run their first cell names, figures included
        assert "lrc-distill" in "".join(nb["cells"][0]["source"]), name
        outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c["outputs"]]
        assert not [o for o in outputs if o["output_type"] == "error"], name
        assert any("image/png" in o.get("data", {}) for o in outputs), name


@pytest.fixture(scope="module")
def kernel(tiny_run):
    """One Jupyter kernel for the analysis notebooks, started in the run's directory with the run in
    ``LRC_NOTEBOOK_RUN`` (a kernel's start and its torch + transformers imports cost about 10 s; each
    notebook still starts from an empty namespace)."""
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name="python3")
    km.start_kernel(cwd=str(tiny_run), env={**os.environ, "LRC_NOTEBOOK_RUN": str(tiny_run),
                                            "MPLBACKEND": "module://matplotlib_inline.backend_inline"})
    try:
        yield km
    finally:
        km.shutdown_kernel(now=True)


@pytest.mark.slow  # a Jupyter kernel (torch + transformers imports): about half a minute for the three
@pytest.mark.parametrize("name", ANALYSES)
def test_analysis_notebook_executes_on_a_tiny_run(name, tiny_run, kernel):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
    # the previous notebook's names are gone: a notebook that relied on them fails with a NameError
    nb.cells.insert(0, nbformat.v4.new_code_cell("%reset -f"))
    NotebookClient(nb, km=kernel, timeout=600).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"run: {tiny_run}" in text  # the parameters cell took the run from the environment
    assert any("image/png" in o.get("data", {}) for o in outputs)
    if name == "projection_analysis":
        assert "checkpoints at steps [1, 2, 3]" in text
    if name == "neuron_masking":
        assert "FFN width 128, 4 teacher layers, 4 student layers" in text
