"""Clone terms: the term registry (a new term is one function and one weight) and fp32 term
values under bf16 autocast."""

from __future__ import annotations

import pytest
import torch
from clone_utils import make_clone, random_ids, randomize_trainable

import lrc.losses as losses
import lrc.model.layers as clone_layers
from lrc.losses import CLONE_TERMS, LossConfig, LRCLoss, TermRequest, clone_term_names, masked_mse, register_clone_term
from lrc.teachers import tiny_teacher


# ------------------------------------------------------------------------ fp32 under autocast
def test_masked_mse_is_fp32_with_an_exact_count_under_autocast():
    """bf16 operands (activations under autocast) and 2001 valid tokens x 16 features: the MSE
    equals an fp64 reference of the same values. In bf16, the sum keeps 8 significant bits and
    the count 2001 rounds to 2000, both off by ~1e-3 relative."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 600, 16, generator=g).bfloat16()
    b = torch.randn(4, 600, 16, generator=g).bfloat16()
    mask = torch.zeros(4, 600, dtype=torch.bool)
    mask.view(-1)[torch.randperm(2400, generator=g)[:2001]] = True
    sq = (a.double() - b.double()) ** 2
    ref_masked = (sq * mask[..., None]).sum() / (2001 * 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_masked = masked_mse(a, b, mask)
        got_all = masked_mse(a, b)
    assert got_masked.dtype == got_all.dtype == torch.float32
    assert got_masked.item() == pytest.approx(ref_masked.item(), rel=1e-6)
    assert got_all.item() == pytest.approx(sq.mean().item(), rel=1e-6)


def test_clone_terms_are_fp32_under_autocast(monkeypatch):
    """A real clone forward under bf16 autocast (bf16 activations, padded batch): every term is
    fp32 and the directly compared terms equal an fp64 MSE of the layer's own activations."""
    clone = make_clone("qwen2", rank=16)
    randomize_trainable(clone, std=0.2)
    ids = random_ids(clone.arch.vocab_size, batch=3, length=40)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, 25:] = 0
    attention_mask[2, 7:] = 0
    seen = []
    real = clone_layers.layer_clone_terms

    def spy(student, teacher, request, **kw):
        out = real(student, teacher, request, **kw)
        seen.append((student, teacher, kw["token_mask"], out))
        return out

    monkeypatch.setattr(clone_layers, "layer_clone_terms", spy)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = clone(ids, attention_mask)
    assert len(seen) == clone.arch.num_layers
    assert all(v.dtype == torch.float32 for v in out.clone_terms.values())
    m = attention_mask.double()[..., None]
    for student, teacher, token_mask, terms in seen:
        assert torch.equal(token_mask, attention_mask.bool())
        for name in ("q", "k", "v", "gate", "up"):
            assert student[name].dtype == torch.bfloat16  # autocast really ran the layer in bf16
            sq = (student[name].double() - teacher[name].double()) ** 2
            ref = (sq * m).sum() / (m.sum() * sq.shape[-1])
            assert terms[name].item() == pytest.approx(ref.item(), rel=1e-6), name


# ------------------------------------------------------------------------ the term registry
@pytest.fixture
def term_registry(monkeypatch):
    """A private copy of the registry, so terms registered by a test do not outlive it."""
    monkeypatch.setattr(losses, "_TERM_REGISTRY", dict(losses._TERM_REGISTRY))


def test_paper_terms_are_registered_in_order():
    assert clone_term_names()[: len(CLONE_TERMS)] == list(CLONE_TERMS)
    assert LRCLoss(LossConfig()).request.terms == CLONE_TERMS


def test_a_new_term_is_one_function_and_one_weight(term_registry):
    """Register an "attn" term (heads concatenated before o_proj, same width in both models), enable
    it by its weight alone, and find its value (against hooks on the teacher and on the exported
    student) in LRCLoss's output, in the weighted sum, and in the gradients."""

    @register_clone_term("attn")
    def attn_term(student, teacher, ctx):
        return masked_mse(student["attn"], teacher["attn"], ctx.token_mask)

    assert LRCLoss(LossConfig()).request.terms == CLONE_TERMS  # added terms are off by default
    loss_fn = LRCLoss(LossConfig(alpha=0.3, term_weights={"attn": 0.5, "q": 0}))
    assert loss_fn.request.terms == ("k", "v", "o", "gate", "up", "down", "attn")

    clone = make_clone("llama", rank=16)
    randomize_trainable(clone, std=0.2)
    ids = random_ids(clone.arch.vocab_size, length=9)
    r = loss_fn(clone(ids, terms=loss_fn.request), ids)

    heads = {}
    for tag, model in (("t", tiny_teacher("llama")), ("s", clone.to_hf())):
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.o_proj.register_forward_hook(
                lambda mod, args, out, key=(tag, i): heads.__setitem__(key, args[0].detach())
            )
        with torch.no_grad():
            model(ids)
    layers = range(clone.arch.num_layers)
    expected = [((heads[("s", i)] - heads[("t", i)]) ** 2).mean().item() for i in layers]
    for i in layers:
        assert r[f"clone/attn/{i}"].item() == pytest.approx(expected[i], rel=1e-4)
    assert r["clone/attn"].item() == pytest.approx(sum(expected), rel=1e-4)
    others = sum(r[f"clone/{t}"] for t in ("k", "v", "o", "gate", "up", "down"))
    assert r["clone"].item() == pytest.approx(others.item() + 0.5 * r["clone/attn"].item(), rel=1e-6)

    # gradients: the last layer's heads depend on its q, k, v projections, not on its FFN's
    r["clone/attn"].backward()
    grads = {n: p.grad for n, p in clone.named_projections()}
    last = clone.arch.num_layers - 1
    for name in ("q", "k", "v"):
        assert grads[f"layers.{last}.{name}"].abs().sum() > 0, name
    for name in ("o", "gate", "up", "down"):
        assert grads[f"layers.{last}.{name}"] is None or grads[f"layers.{last}.{name}"].abs().sum() == 0, name


def test_unknown_terms_are_rejected(term_registry):
    with pytest.raises(ValueError, match=r"unknown terms \['attn'\]"):
        LossConfig(term_weights={"attn": 1.0})
    with pytest.raises(ValueError, match=r"TermRequest.terms has unknown terms \['attn'\]"):
        TermRequest(terms=("q", "attn"))
    register_clone_term("attn")(lambda s, t, ctx: masked_mse(s["attn"], t["attn"], ctx.token_mask))
    assert "attn" in clone_term_names() and LossConfig(term_weights={"attn": 1.0}).weight("attn") == 1.0
    assert LossConfig().weight("attn") == 0.0
