"""The clone on the real SmolLM2-135M-Instruct teacher (slow: minutes on 2 CPU cores)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lrc.losses import LossConfig, LRCLoss
from lrc.model import CloneConfig, LowRankClone

pytestmark = pytest.mark.slow


def test_rank_288_clone_forward_backward(real_teacher, tmp_path):
    teacher, tok = real_teacher
    clone = LowRankClone.from_teacher(teacher, CloneConfig(rank=288), tokenizer=tok)
    assert sum(1 for _ in clone.named_projections()) == 1 + 30 * 7
    text = ["The capital of France is Paris. It is known for the Eiffel Tower and its museums."] * 2
    ids = tok(text, return_tensors="pt")["input_ids"]
    loss_fn = LRCLoss(LossConfig(alpha=0.2))
    out = clone(ids, terms=loss_fn.request)
    # the teacher stream is the teacher
    with torch.no_grad():
        assert (out.teacher_logits - teacher(ids).logits).abs().max() < 1e-3
    terms = loss_fn(out, ids)
    assert all(math.isfinite(v.item()) for v in terms.values())
    # a random rank-288 student is far from the teacher: CE near log(V), KL and clone terms positive
    assert terms["ce"].item() == pytest.approx(math.log(49152), abs=1.5)
    assert terms["kl"].item() > 0 and terms["clone"].item() > 0
    terms["loss"].backward()
    grads = {n: p.grad for n, p in clone.named_projections()}
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
    assert all(p.grad is None for p in teacher.parameters())
    # the merged student is a 30-layer, 288-wide Llama with the teacher's head_dim
    student = clone.to_hf()
    assert (student.config.hidden_size, student.config.head_dim, student.config.num_hidden_layers) == (288, 64, 30)
    with torch.no_grad():
        assert (student(ids).logits - clone(ids).student_logits).abs().max() < 1e-3


def test_readme_python_example_runs(real_teacher, smollm2_cache, tmp_path, monkeypatch):
    """The README's API example, executed as written (in a temporary working directory)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("```python\n") + len("```python\n")
    code = readme[start : readme.index("```", start)]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LRC_CACHE", str(smollm2_cache))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["student"].config.hidden_size == 288
    assert (tmp_path / "my-student" / "config.json").is_file()
    assert scope["terms"]["loss"].item() > 0
