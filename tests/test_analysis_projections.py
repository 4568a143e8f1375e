"""lrc.analysis.projections against closed forms: spectra of known matrices, Gram similarity of
rotated, rescaled and truncated copies, and the student's FFN Gram from projections equal to the
exported student's."""

from __future__ import annotations

import math

import pytest
import torch

from lrc.analysis.curves import per_layer_terms
from lrc.analysis.projections import (
    checkpoint_projections,
    effective_rank,
    ffn_gram_similarity,
    ffn_gram_similarity_from_projections,
    gram_cosine,
    gram_similarity,
    neuron_cosine,
    neuron_gram,
    run_checkpoints,
    singular_values,
    spectra_over_checkpoints,
    spectrum_summary,
)


def orthogonal(n: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def test_singular_values_of_a_known_matrix():
    sigma = torch.tensor([5.0, 3.0, 2.0, 0.5], dtype=torch.float64)
    u, v = orthogonal(6, 0)[:, :4], orthogonal(4, 1)
    m = u @ torch.diag(sigma) @ v.T  # 6 x 4 with exactly these singular values
    assert torch.allclose(singular_values(m), sigma, atol=1e-12)
    s = spectrum_summary(m)
    assert s["sigma_max"] == pytest.approx(5.0) and s["sigma_min"] == pytest.approx(0.5)
    assert s["condition"] == pytest.approx(10.0)
    assert s["stable_rank"] == pytest.approx((25 + 9 + 4 + 0.25) / 25)
    p = sigma / sigma.sum()
    assert s["effective_rank"] == pytest.approx(math.exp(-sum(float(x) * math.log(float(x)) for x in p)))


def test_effective_rank_limits():
    assert effective_rank(torch.ones(7)) == pytest.approx(7.0)
    assert effective_rank(torch.tensor([3.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank(torch.zeros(3)) == 0.0
    assert spectrum_summary(torch.zeros(3, 2))["condition"] == math.inf


def test_gram_of_rotated_and_rescaled_copies_is_identical():
    w = torch.randn(12, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)  # F x D, neurons = rows
    q = orthogonal(5, 3)
    assert torch.allclose(neuron_gram(w @ q, 0), neuron_gram(w, 0), atol=1e-12)
    assert gram_similarity(w, 3.0 * w @ q, 0) == pytest.approx({"gram_cosine": 1.0, "neuron_cosine": 1.0})
    # neurons along columns (down: D x F): the rotation acts on the rows
    assert gram_similarity(w.T, q.T @ w.T, 1) == pytest.approx({"gram_cosine": 1.0, "neuron_cosine": 1.0})
    assert neuron_gram(w, 1).shape == (5, 5) and neuron_gram(w, 0).shape == (12, 12)
    with pytest.raises(ValueError, match="different shapes"):
        gram_cosine(neuron_gram(w, 0), neuron_gram(w, 1))
    with pytest.raises(ValueError, match="neuron_axis"):
        neuron_gram(w, 2)


def test_gram_cosine_of_a_truncated_projection_closed_form():
    """W = U diag(s) (orthonormal U), P = the first d axes: G_t = U diag(s^2) U^T and G_s = U diag(s^2
    truncated) U^T, so cos = sqrt(sum_{i<d} s^4 / sum s^4)."""
    s = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    u = orthogonal(9, 4)[:, :5]
    w = u @ torch.diag(s)
    for d in (1, 3, 5):
        p = torch.eye(5, dtype=torch.float64)[:, :d]
        expected = math.sqrt(float((s[:d] ** 4).sum() / (s**4).sum()))
        assert gram_cosine(neuron_gram(w, 0), neuron_gram(w @ p, 0)) == pytest.approx(expected, abs=1e-12)
    # neuron_cosine by hand: per-row cosine of the two Gram matrices, averaged
    gt, gs = neuron_gram(w, 0), neuron_gram(w @ torch.eye(5, dtype=torch.float64)[:, :2], 0)
    by_hand = sum(float(gt[i] @ gs[i] / (gt[i].norm() * gs[i].norm())) for i in range(9)) / 9
    assert neuron_cosine(gt, gs) == pytest.approx(by_hand, abs=1e-12)


@pytest.mark.parametrize("ffn_sharing", ["all", "io"])
def test_ffn_gram_from_projections_equals_the_exported_student(ffn_sharing):
    from lrc.model import CloneConfig, LowRankClone
    from lrc.teachers import load_teacher

    teacher, tok = load_teacher("tiny-llama")
    clone = LowRankClone.from_teacher(teacher, CloneConfig(rank=16, ffn_sharing=ffn_sharing, layers=[0, 2]), tokenizer=tok)
    student = clone.to_hf()
    projections = dict(clone.named_projections())
    from_proj = ffn_gram_similarity_from_projections(teacher, projections)
    exported = ffn_gram_similarity(teacher, student, layer_map={0: 0, 2: 1})
    assert [(r["layer"], r["matrix"]) for r in from_proj] == [(la, m) for la in (0, 2) for m in ("gate", "up", "down")]
    for a, b in zip(from_proj, exported):
        assert (a["layer"], a["matrix"]) == (b["layer"], b["matrix"])
        assert a["gram_cosine"] == pytest.approx(b["gram_cosine"], abs=1e-6)
        assert a["neuron_cosine"] == pytest.approx(b["neuron_cosine"], abs=1e-6)
        assert 0 < a["gram_cosine"] < 1  # a random rank-16 projection of a 64-wide teacher loses geometry
    picked = ffn_gram_similarity_from_projections(teacher, projections, layers=[2])
    assert picked == [r for r in from_proj if r["layer"] == 2]
    with pytest.raises(ValueError, match=r"layers \[1\] have no FFN projections"):
        ffn_gram_similarity_from_projections(teacher, projections, layers=[1])


def test_checkpoint_projections_and_spectra(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    p0 = torch.diag(torch.tensor([2.0, 1.0]))
    for step in (10, 2):  # written out of order: read by step
        sd = {"clone.io.proj_embed": torch.eye(2), "clone.layers.0.proj.q": step * p0, "clone.layers.0.norms.attn": torch.ones(2)}
        torch.save({"global_step": step, "state_dict": sd, "lrc": {}}, folder / f"step{step:06d}.ckpt")
    torch.save({"global_step": 10, "state_dict": {}, "lrc": {}}, folder / "last.ckpt")
    paths = run_checkpoints(tmp_path)
    assert [p.name for p in paths] == ["step000002.ckpt", "step000010.ckpt"]
    step, proj = checkpoint_projections(paths[0])
    assert step == 2 and sorted(proj) == ["embed", "layers.0.q"]
    rows = spectra_over_checkpoints(paths, names=["layers.0.q"])
    assert [(r["step"], r["sigma"]) for r in rows] == [(2, [4.0, 2.0]), (10, [20.0, 10.0])]
    assert rows[0]["condition"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="no projection named"):
        spectra_over_checkpoints(paths, names=["layers.9.q"])
    with pytest.raises(ValueError, match="no LRC projections"):
        checkpoint_projections(folder / "last.ckpt")
    with pytest.raises(ValueError, match="no checkpoint"):
        run_checkpoints(tmp_path / "nowhere")


def test_per_layer_terms_from_logged_rows():
    rows = [
        {"step": 0, "train_layers/clone/q/0": 1.0, "train_layers/clone/q/1": 2.0, "train_layers/clone/down/1": 5.0},
        {"step": 1, "train/loss": 3.0},
        {"step": 2, "train_layers/clone/q/1": 4.0, "train_layers/clone/q/0": 3.0},
    ]
    terms = per_layer_terms(rows)
    assert sorted(terms) == ["down", "q"]
    assert terms["q"] == {"steps": [0, 2], "layers": [0, 1], "values": [[1.0, 2.0], [3.0, 4.0]]}
    assert terms["down"]["steps"] == [0] and terms["down"]["values"] == [[5.0]]
