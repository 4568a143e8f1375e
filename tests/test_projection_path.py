"""``student.projection_path``: materialising W_t @ P once per forward and applying the two factors
to the activations give the same outputs and gradients; ``auto`` picks the path the closed-form
FLOP counts say is cheaper."""

from __future__ import annotations

import math

import pytest
import torch
from clone_utils import ARCHS, make_clone, random_ids, randomize_trainable

from lrc.losses import LossConfig, LRCLoss
from lrc.model import CloneConfig
from lrc.model.functional import Factored
from lrc.model.layers import choose_projection_path, projection_path_flops


def _step(clone, ids, mask, path):
    for layer in clone.layers:
        layer.projection_path = path
    clone.zero_grad(set_to_none=True)
    loss_fn = LRCLoss(LossConfig(alpha=0.5, attn_out_space="student"))
    out = clone(ids, attention_mask=mask, terms=loss_fn.request)
    terms = loss_fn(out, ids)
    terms["loss"].backward()
    grads = {n: p.grad.clone() for n, p in clone.named_trainable()}
    return out, terms, grads


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("sharing", ["all", "io"])
def test_both_paths_give_the_same_outputs_and_gradients(arch, sharing):
    clone = make_clone(arch, rank=8, attn_sharing=sharing, ffn_sharing=sharing)
    randomize_trainable(clone)
    clone.double()  # fp64: the two orders of products then agree to ~1e-12 (the KL at tau=40 is tiny)
    ids = random_ids(clone.teacher_config.vocab_size, batch=2, length=9)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    out_m, terms_m, grads_m = _step(clone, ids, mask, "materialise")
    out_f, terms_f, grads_f = _step(clone, ids, mask, "factored")
    scale = out_m.student_logits.abs().max().item()
    assert (out_f.student_logits - out_m.student_logits).abs().max().item() <= 1e-12 * scale
    for key, value in terms_m.items():
        assert torch.allclose(terms_f[key], value, rtol=1e-9, atol=1e-15), key
    for name, g in grads_m.items():
        assert (grads_f[name] - g).abs().max().item() <= 1e-9 * g.abs().max().item(), name


def test_factored_path_really_applies_factors():
    """The factored forward hands the layer Factored matrices (no product of the two), with the
    teacher's bias for the output side; the materialised one plain tensors."""
    clone = make_clone("qwen2", rank=8, attn_sharing="io")
    layer = clone.layers[0]
    layer.projection_path = "factored"
    w = layer.forward_weights(tokens=18)
    assert all(isinstance(w[k], Factored) for k in ("wq", "wk", "wv", "wo", "wgate", "wup", "wdown"))
    # one lift x @ Pqkv.T for q, k and v (shared projection), separate ones for gate and up
    assert w["wq"].lift is w["wk"].lift is w["wv"].lift and w["wgate"].lift is not w["wup"].lift
    assert w["wo"].proj is not None and w["wo"].lift is None
    assert torch.equal(w["bq"], layer.teacher["bq"])  # Qwen2's head-side biases are not projected
    layer.projection_path = "materialise"
    assert not any(isinstance(v, Factored) for v in layer.forward_weights(tokens=18).values())


def test_export_is_the_same_whatever_the_path():
    a = make_clone("llama", rank=8, projection_path="factored")
    b = make_clone("llama", rank=8, projection_path="materialise")
    for clone in (a, b):
        randomize_trainable(clone)
    sa, sb = a.to_hf().state_dict(), b.to_hf().state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _threshold(inner, big, d):
    """Tokens above which materialising is cheaper, from 4Dds + 6nds = 6ndD + 4nDs (fwd + bwd)."""
    s = sum(inner)
    return 4 * big * d * s / (6 * d * big + 4 * big * s - 6 * d * s)


@pytest.mark.parametrize("inner,big,d", [([64], 64, 32), ([16, 16, 32], 64, 16), ([3072], 3072, 1536),
                                         ([1024], 3072, 1536), ([8192, 8192], 3072, 1536)])
def test_auto_picks_the_path_of_fewer_flops(inner, big, d):
    n_star = _threshold(inner, big, d)
    below, above = max(1, math.floor(n_star) - 1), math.ceil(n_star) + 1
    assert choose_projection_path("auto", below, inner, big, d) == "factored"
    assert choose_projection_path("auto", above, inner, big, d) == "materialise"
    for n in (below, above):  # a fixed setting is never overridden
        assert choose_projection_path("factored", n, inner, big, d) == "factored"
        assert choose_projection_path("materialise", n, inner, big, d) == "materialise"


def test_flop_counts_by_hand():
    # one 6 x 4 input-side matrix, rank 2, 5 tokens, forward + backward
    # materialise: product 2*6*4*2=96 (+ its P gradient 96); apply 2*5*2*6=120, x- and W_s-grads 240
    # factored: lift 2*5*2*4=80 (+ 80 + 80 backward); W_t 2*5*4*6=240 (+ 240 backward)
    assert projection_path_flops(5, [6], 4, 2) == {"materialise": 96 * 2 + 120 * 3, "factored": 80 * 3 + 240 * 2}
    assert projection_path_flops(5, [6], 4, 2, backward=False) == {"materialise": 96 + 120, "factored": 80 + 240}


def test_auto_in_a_forward_follows_the_token_count():
    clone = make_clone("llama", rank=8)  # tiny: D = 64
    layer = clone.layers[0]
    assert set(layer.projection_paths(tokens=1).values()) == {"factored"}
    assert set(layer.projection_paths(tokens=10_000).values()) == {"materialise"}


def test_unknown_projection_path_is_refused():
    with pytest.raises(ValueError, match="CloneConfig.projection_path"):
        CloneConfig(rank=8, projection_path="both").validate(64, 2)
