"""CE and KL over chunks of positions (``loss.logit_chunk_size``): the same values and gradients as
the unchunked functions, from logits or from hidden states through the heads, and a clone training
step that never keeps a full-vocabulary tensor for the backward."""

from __future__ import annotations

import math

import pytest
import torch
from clone_utils import make_clone, random_ids, randomize_trainable

from lrc import losses
from lrc.losses import KL_REDUCTIONS, LossConfig, LRCLoss, chunked_ce_kl, kl_divergence, next_token_cross_entropy

B, T, D_S, D_T, V = 2, 7, 5, 6, 11
TAU = 3.0
WEIGHTS = [(1.0, 0.0), (0.0, 1.0), (0.7, 1.3)]  # CE alone, KL alone, both


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h_s, head_s = torch.randn(B, T, D_S, generator=g), torch.randn(V, D_S, generator=g)
    h_t, head_t = torch.randn(B, T, D_T, generator=g), torch.randn(V, D_T, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:] = False  # the second sequence is padded after 4 tokens
    labels = torch.randint(0, V, (B, T), generator=g).masked_fill(~mask, -100)
    return h_s, head_s, h_t, head_t, mask, labels


def _reference(z_s, z_t, labels, mask, w_ce, w_kl, reduction, tau_squared):
    ce = next_token_cross_entropy(z_s, labels)
    kl = kl_divergence(z_s, z_t, TAU, reduction, tau_squared, mask)
    return w_ce * ce + w_kl * kl, ce, kl


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= 1e-6 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("reduction", KL_REDUCTIONS)
@pytest.mark.parametrize("tau_squared", [False, True])
@pytest.mark.parametrize("w_ce,w_kl", WEIGHTS)
@pytest.mark.parametrize("chunk", [1, 3, 64])  # one position, a size that does not divide B*T=14, all at once
def test_chunked_from_hidden_states_matches_unchunked(reduction, tau_squared, w_ce, w_kl, chunk):
    h_s, head_s, h_t, head_t, mask, labels = _inputs()
    h_s.requires_grad_(), head_s.requires_grad_()
    ref, ce, kl = _reference(h_s @ head_s.T, h_t @ head_t.T, labels, mask, w_ce, w_kl, reduction, tau_squared)
    grads = torch.autograd.grad(ref, (h_s, head_s))
    loss, ce_c, kl_c = chunked_ce_kl(
        h_s, h_t, labels, chunk_size=chunk, w_ce=w_ce, w_kl=w_kl, temperature=TAU, reduction=reduction,
        tau_squared=tau_squared, token_mask=mask, student_head=head_s, teacher_head=head_t,
    )
    _close(loss, ref)
    if w_ce:
        _close(ce_c, ce)
    if w_kl:
        _close(kl_c, kl)
    for got, want in zip(torch.autograd.grad(loss, (h_s, head_s)), grads):
        _close(got, want)


@pytest.mark.parametrize("w_ce,w_kl", WEIGHTS)
@pytest.mark.parametrize("rows_per_tile", [1, 3])
def test_cache_sized_tiles_of_rows_match_unchunked(monkeypatch, w_ce, w_kl, rows_per_tile):
    """On a CPU the fused passes walk each chunk a cache-sized tile of rows at a time
    (``CPU_TILE_BYTES``); tiles of 1 and 3 rows (not dividing a chunk of 5) give the same values
    and gradients as autograd on the whole logits."""
    monkeypatch.setattr(losses, "CPU_TILE_BYTES", rows_per_tile * V * 4)
    h_s, head_s, h_t, head_t, mask, labels = _inputs(3)
    h_s.requires_grad_(), head_s.requires_grad_()
    ref, _, _ = _reference(h_s @ head_s.T, h_t @ head_t.T, labels, mask, w_ce, w_kl, "token_mean", False)
    want = torch.autograd.grad(ref, (h_s, head_s))
    loss, _, _ = chunked_ce_kl(h_s, h_t, labels, chunk_size=5, w_ce=w_ce, w_kl=w_kl, temperature=TAU,
                               reduction="token_mean", token_mask=mask, student_head=head_s, teacher_head=head_t)
    _close(loss, ref)
    for got, expected in zip(torch.autograd.grad(loss, (h_s, head_s)), want):
        _close(got, expected)


@pytest.mark.parametrize("reduction", KL_REDUCTIONS)
@pytest.mark.parametrize("tau_squared", [False, True])
@pytest.mark.parametrize("w_ce,w_kl", WEIGHTS)
def test_chunked_from_logits_matches_unchunked(reduction, tau_squared, w_ce, w_kl):
    h_s, head_s, h_t, head_t, mask, labels = _inputs(1)
    z_s = (h_s @ head_s.T).requires_grad_()
    z_t = h_t @ head_t.T
    ref, _, _ = _reference(z_s, z_t, labels, mask, w_ce, w_kl, reduction, tau_squared)
    (want,) = torch.autograd.grad(ref, z_s)
    given = z_s.detach().clone(), z_t.clone()
    loss, _, _ = chunked_ce_kl(z_s, z_t, labels, chunk_size=4, w_ce=w_ce, w_kl=w_kl, temperature=TAU,
                               reduction=reduction, tau_squared=tau_squared, token_mask=mask)
    _close(loss, ref)
    assert torch.equal(z_s, given[0]) and torch.equal(z_t, given[1])  # the work is done on copies
    (got,) = torch.autograd.grad(loss, z_s)
    _close(got, want)


def test_chunked_without_mask_or_grad():
    h_s, head_s, h_t, head_t, _, labels = _inputs(2)
    labels = labels.clamp_min(0)
    ref, _, _ = _reference(h_s @ head_s.T, h_t @ head_t.T, labels, None, 1.0, 1.0, "token_mean", False)
    with torch.no_grad():
        loss, _, _ = chunked_ce_kl(h_s, h_t, labels, chunk_size=5, temperature=TAU, reduction="token_mean",
                                   student_head=head_s, teacher_head=head_t)
    _close(loss, ref)
    assert not loss.requires_grad


@pytest.mark.parametrize("bad", [-1, 1.5, True, "8"])
def test_bad_chunk_size_is_refused(bad):
    with pytest.raises(ValueError, match="LossConfig.logit_chunk_size"):
        LossConfig(logit_chunk_size=bad)


def _clone_and_batch():
    clone = make_clone("qwen2", rank=8)
    randomize_trainable(clone)
    ids = random_ids(clone.teacher_config.vocab_size, batch=2, length=10)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0  # padding, so the token mask is in play
    return clone, ids, mask


def _saved_shapes(fn) -> list[tuple[int, ...]]:
    """Run ``fn`` and return the shapes of every tensor autograd saved for the backward meanwhile."""
    shapes: list[tuple[int, ...]] = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


@pytest.mark.parametrize("reduction", KL_REDUCTIONS)
def test_lrc_loss_equals_autograd_on_the_logits_of_a_clone(reduction):
    """LRCLoss computes CE and KL from the forward's hidden states and heads (in chunks, or every
    position at once when unset): the same values and gradients as autograd through the
    unchunked functions on the logits of a forward with ``logits=True``, and no tensor of
    vocabulary width is kept for the backward."""
    clone, ids, mask = _clone_and_batch()
    v = clone.teacher_config.vocab_size
    labels = ids.masked_fill(~mask.bool(), -100)
    results = {}
    for chunk in ("reference", None, 6):
        cfg = LossConfig(alpha=0.5, temperature=TAU, kl_reduction=reduction, kl_tau_squared=True,
                         logit_chunk_size=None if chunk == "reference" else chunk)
        loss_fn = LRCLoss(cfg)
        clone.zero_grad(set_to_none=True)
        box = {}

        def step():
            if chunk == "reference":
                out = clone(ids, attention_mask=mask, terms=loss_fn.request, logits=True)
                w = {"ce": next_token_cross_entropy(out.student_logits, labels),
                     "kl": kl_divergence(out.student_logits, out.teacher_logits, TAU, reduction, True, out.token_mask)}
                w["clone"] = sum(out.clone_terms.values())
                w["loss"] = w["ce"] + w["kl"] + 0.5 * w["clone"]
                box["out"], box["terms"] = out, w
            else:
                out = clone(ids, attention_mask=mask, terms=loss_fn.request, logits=loss_fn.wants_logits)
                box["out"], box["terms"] = out, loss_fn(out, ids)

        # positions covered by a saved tensor of vocabulary width (logits, log-probabilities)
        vocab_rows = [math.prod(s) // v for s in _saved_shapes(step) if s and s[-1] == v]
        box["terms"]["loss"].backward()
        grads = {n: p.grad.clone() for n, p in clone.named_trainable()}
        results[chunk] = (box["terms"], grads, max(vocab_rows, default=0), box["out"])
    t0, g0, big0, _ = results["reference"]
    assert big0 >= ids.numel()  # autograd keeps (B, T, V) logits for its backward
    for chunk in (None, 6):
        t1, g1, big1, out1 = results[chunk]
        for key in ("loss", "ce", "kl", "clone"):
            _close(t1[key], t0[key])
        for name in g0:
            _close(g1[name], g0[name])
        assert out1.student_logits is None and out1.head is not None
        assert big1 == 0


def test_lrc_loss_takes_a_forwards_logits():
    """A forward with ``logits=True`` (what validation runs) gives LRCLoss the logits themselves:
    the same values as from the head inputs."""
    clone, ids, _ = _clone_and_batch()
    loss_fn = LRCLoss(LossConfig(temperature=TAU))
    with torch.no_grad():
        from_logits = loss_fn(clone(ids, logits=True, terms=loss_fn.request), ids)
        from_heads = loss_fn(clone(ids, logits=False, terms=loss_fn.request), ids)
    for key in ("loss", "ce", "kl"):
        _close(from_logits[key], from_heads[key])
