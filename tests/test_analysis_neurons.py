"""lrc.analysis.neurons against hand computation on a tiny teacher: activation scores, masking by
hook equal to zeroing down_proj's columns, masking nothing changes nothing, the loss equals
transformers' own, and the masking study's rows."""

from __future__ import annotations

import copy

import pytest
import torch

from lrc.analysis.neurons import (
    ffn_width,
    masked_neurons,
    masking_study,
    neuron_scores,
    next_token_loss,
    random_neurons,
    top_neurons,
)


@pytest.fixture(scope="module")
def model():
    from lrc.teachers import tiny_teacher

    return tiny_teacher("llama")


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 259, (2, 12), generator=torch.Generator().manual_seed(0))


def test_scores_equal_the_activation_computed_by_hand(model, ids):
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    inputs = []
    handles = [layer.mlp.register_forward_pre_hook(lambda _m, a: inputs.append(a[0])) for layer in model.model.layers]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for h in handles:
        h.remove()
    scores = neuron_scores(model, ids, mask)
    assert scores.shape == (len(model.model.layers), ffn_width(model))
    for i, (layer, x) in enumerate(zip(model.model.layers, inputs)):
        mlp = layer.mlp
        act = (mlp.act_fn(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)).abs()  # (B, T, F)
        expected = (act * mask.unsqueeze(-1)).sum((0, 1)) / mask.sum()
        assert torch.allclose(scores[i].float(), expected, atol=1e-5)


def test_masking_nothing_changes_nothing(model, ids):
    with torch.no_grad():
        ref = model(ids).logits
        with masked_neurons(model, {0: [], 1: torch.empty(0, dtype=torch.long)}):
            same = model(ids).logits
    assert torch.equal(ref, same)


def test_masking_equals_zeroing_down_proj_columns_by_hand(model, ids):
    neurons = {0: [3, 7, 100], 2: [0, 5]}
    by_hand = copy.deepcopy(model)
    with torch.no_grad():
        for layer, idx in neurons.items():
            by_hand.model.layers[layer].mlp.down_proj.weight[:, idx] = 0
        with masked_neurons(model, neurons):
            masked = model(ids).logits
        expected = by_hand(ids).logits
        after = model(ids).logits  # the hooks are gone once the block ends
        ref = copy.deepcopy(model)(ids).logits
    assert torch.allclose(masked, expected, atol=1e-6)
    assert not torch.allclose(masked, after, atol=1e-4)
    assert torch.equal(after, ref)
    with pytest.raises(ValueError, match="out of range"):
        with masked_neurons(model, {99: [0]}):
            pass


def test_next_token_loss_equals_transformers_loss(model, ids):
    with torch.no_grad():
        expected = model(input_ids=ids, labels=ids).loss.item()
    assert next_token_loss(model, ids) == pytest.approx(expected, rel=1e-5)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    assert next_token_loss(model, ids, mask) == pytest.approx(expected, rel=1e-5)


def test_top_and_random_neurons():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7], [4.0, 3.0, 2.0, 1.0]])
    assert top_neurons(scores, 2).tolist() == [[1, 3], [0, 1]]
    assert top_neurons(scores, 0).shape == (2, 0)
    with pytest.raises(ValueError, match="k must be"):
        top_neurons(scores, 5)
    top = top_neurons(scores, 2)
    r = random_neurons(2, 4, 2, seed=1, exclude=top)
    assert sorted(r[0].tolist()) == [0, 2] and sorted(r[1].tolist()) == [2, 3]  # the only ones left
    big = random_neurons(3, 50, 10, seed=7)
    assert torch.equal(big, random_neurons(3, 50, 10, seed=7))
    assert all(len(set(row.tolist())) == 10 for row in big)
    with pytest.raises(ValueError, match="only 2 neurons left"):
        random_neurons(2, 4, 3, exclude=top)


def test_masking_study_rows(model, ids):
    student = copy.deepcopy(model)  # the same weights: the student's rows must equal the teacher's
    rows = masking_study(model, student, ids, k=16, seed=0)
    assert [(r["model"], r["mask"]) for r in rows] == [(m, k) for m in ("teacher", "student") for k in ("none", "top", "random")]
    t, s = rows[:3], rows[3:]
    for a, b in zip(t, s):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    assert t[0]["delta"] == 0 and t[0]["loss"] == pytest.approx(next_token_loss(model, ids))
    # the top mask is what masking the teacher's top-16 neurons by hand gives
    top = top_neurons(neuron_scores(model, ids), 16)
    with masked_neurons(model, dict(enumerate(top))):
        assert t[1]["loss"] == pytest.approx(next_token_loss(model, ids), abs=1e-6)
    assert t[1]["delta"] == pytest.approx(t[1]["loss"] - t[0]["loss"])
    zero = masking_study(model, student, ids, k=0)
    assert all(r["delta"] == 0 for r in zero)


def test_masking_study_refuses_different_ffn_widths(model, ids):
    from lrc.teachers import tiny_teacher

    other = tiny_teacher("llama", intermediate_size=64)
    with pytest.raises(ValueError, match="FFN widths differ"):
        masking_study(model, other, ids, k=2)
