"""Loss values against hand computation (explicit loops / closed forms on small tensors)."""

from __future__ import annotations

import math

import pytest
import torch
from clone_utils import make_clone, random_ids, randomize_trainable

from lrc.losses import (
    CLONE_TERMS,
    LossConfig,
    LRCLoss,
    TermRequest,
    kl_divergence,
    layer_clone_terms,
    masked_mse,
    next_token_cross_entropy,
)
from lrc.model.clone import CloneOutput

g = torch.Generator().manual_seed(0)


def rnd(*shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def loop_kl(s, t, tau, mask=None):
    """KL(softmax(t/tau) || softmax(s/tau)) per position, by explicit loops."""
    b, n, v = s.shape
    out = torch.zeros(b, n, dtype=torch.float64)
    for i in range(b):
        for j in range(n):
            zs = [math.exp(s[i, j, k].item() / tau) for k in range(v)]
            zt = [math.exp(t[i, j, k].item() / tau) for k in range(v)]
            ps, pt = [z / sum(zs) for z in zs], [z / sum(zt) for z in zt]
            out[i, j] = sum(pt[k] * math.log(pt[k] / ps[k]) for k in range(v))
    if mask is not None:
        out = out * mask
    return out


def test_masked_mse_by_hand():
    a, b = rnd(2, 3, 4), rnd(2, 3, 4)
    assert masked_mse(a, b).item() == pytest.approx(((a - b) ** 2).sum().item() / 24)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    total = sum(((a[i, j] - b[i, j]) ** 2).sum().item() for i in range(2) for j in range(3) if mask[i, j])
    assert masked_mse(a, b, mask).item() == pytest.approx(total / (3 * 4))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_masked_mse_gradients_by_hand(dtype, masked):
    """The fused MSE's gradients: d/da = 2 m (a - b) / count and d/db its negative, each in its
    operand's dtype (half precision is reduced in fp32)."""
    a, b = rnd(2, 3, 4).to(dtype).requires_grad_(), rnd(2, 3, 4).to(dtype).requires_grad_()
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]]) if masked else torch.ones(2, 3, dtype=torch.int64)
    count = mask.sum().item() * 4
    value = masked_mse(a, b, mask if masked else None)
    assert value.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)
    g_a, g_b = torch.autograd.grad(value * 3.0, (a, b))
    want = 3.0 * 2 * (a.double() - b.double()) * mask[..., None] / count
    assert g_a.dtype == g_b.dtype == dtype
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-12
    assert torch.allclose(g_a.double(), want, atol=tol) and torch.allclose(g_b.double(), -want, atol=tol)
    with pytest.raises(ValueError, match="one shape"):
        masked_mse(a, b[:, :2])


def test_next_token_cross_entropy_by_hand():
    logits = rnd(2, 4, 5)
    labels = torch.tensor([[1, 2, 3, 4], [0, 1, -100, 2]])
    terms = []
    for i in range(2):
        for j in range(3):
            y = labels[i, j + 1].item()
            if y == -100:
                continue
            row = logits[i, j]
            terms.append(-(row[y] - torch.logsumexp(row, 0)).item())
    assert next_token_cross_entropy(logits, labels).item() == pytest.approx(sum(terms) / len(terms))


@pytest.mark.parametrize("tau", [1.0, 40.0])
def test_kl_reductions_by_hand(tau):
    s, t = rnd(2, 3, 5) * 5, rnd(2, 3, 5) * 5
    per = loop_kl(s, t, tau)
    assert kl_divergence(s, t, tau, "sequence_sum").item() == pytest.approx(per.sum().item() / 2, rel=1e-6)
    assert kl_divergence(s, t, tau, "token_mean").item() == pytest.approx(per.mean().item(), rel=1e-6)
    assert kl_divergence(s, t, tau, "token_mean", tau_squared=True).item() == pytest.approx(
        per.mean().item() * tau**2, rel=1e-6
    )
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    per_m = loop_kl(s, t, tau, mask)
    assert kl_divergence(s, t, tau, "token_mean", token_mask=mask).item() == pytest.approx(
        per_m.sum().item() / 4, rel=1e-6
    )
    assert kl_divergence(s, t, tau, "sequence_sum", token_mask=mask).item() == pytest.approx(
        per_m.sum().item() / 2, rel=1e-6
    )
    with pytest.raises(ValueError, match="kl reduction"):
        kl_divergence(s, t, tau, "batchmean")


def test_kl_gradient_flows_to_student_only():
    s = rnd(1, 2, 4).requires_grad_()
    t = rnd(1, 2, 4).requires_grad_()
    kl_divergence(s, t, 2.0).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None


def _acts(d_inner=6, d_t=5, d_s=3):
    names = {"q": d_inner, "k": d_inner, "v": d_inner, "gate": d_inner, "up": d_inner, "attn": d_inner}
    student = {k: rnd(2, 3, w) for k, w in names.items()}
    teacher = {k: rnd(2, 3, w) for k, w in names.items()}
    student["o"], student["down"] = rnd(2, 3, d_s), rnd(2, 3, d_s)
    teacher["o"], teacher["down"] = rnd(2, 3, d_t), rnd(2, 3, d_t)
    return student, teacher, rnd(d_t, d_inner), rnd(d_t), rnd(d_t, d_s), rnd(d_t, d_s)


def _ctx(wo, bo, po, pdown):
    """The layer context of :func:`layer_clone_terms`: teacher o_proj weight/bias, Po and Pdown."""
    return {"teacher_weights": {"wo": wo, "bo": bo}, "projections": {"o": po, "down": pdown}}


def test_layer_terms_in_both_spaces_by_hand():
    s, t, wo, bo, po, pdown = _acts()

    def mse(a, b):
        return ((a - b) ** 2).mean().item()

    for space in ("teacher", "student"):
        req = TermRequest(attn_out_space=space)
        got = layer_clone_terms(s, t, req, **_ctx(wo, bo, po, pdown))
        for name in ("q", "k", "v", "gate", "up"):
            assert got[name].item() == pytest.approx(mse(s[name], t[name]))
        if space == "teacher":  # student heads through the teacher's o_proj, width D
            assert got["o"].item() == pytest.approx(mse(s["attn"] @ wo.T + bo, t["o"]))
        else:  # student o_attn vs teacher o_attn @ Po, width d
            assert got["o"].item() == pytest.approx(mse(s["o"], t["o"] @ po))
        assert got["down"].item() == pytest.approx(mse(s["down"], t["down"] @ pdown))
    only = layer_clone_terms(s, t, TermRequest(terms=("gate",)), **_ctx(wo, bo, po, pdown))
    assert list(only) == ["gate"]


@pytest.mark.parametrize("term", ["down", "o"])
@pytest.mark.parametrize("detach", [False, True])
def test_projected_target_detach_gradient_closed_form(term, detach):
    """student output = A @ P, target = B @ P (o in student space, down): the gradient of
    mean((AP - BP)^2) w.r.t. P comes from the student side only (detached) or from both."""
    a, b = rnd(4, 5), rnd(4, 5)
    p = rnd(5, 3).requires_grad_()
    s, t, wo, bo, po, pdown = _acts()
    student = dict(s, **{term: (a @ p)[None]})
    teacher = dict(t, **{term: b[None]})
    req = TermRequest(
        terms=(term,), attn_out_space="student", detach_down_target=detach and term == "down",
        detach_o_target=detach and term == "o",
    )
    out = layer_clone_terms(
        student, teacher, req, **_ctx(wo, bo, p if term == "o" else po, p if term == "down" else pdown)
    )
    out[term].backward()
    r = a @ p.detach() - b @ p.detach()
    expected = 2 / r.numel() * (a.T @ r if detach else (a - b).T @ r)
    assert torch.allclose(p.grad, expected)


def fake_output(layers=(0, 1, 2), terms=CLONE_TERMS, value=lambda i, t: 0.1 * (i + 1) + 0.01 * CLONE_TERMS.index(t)):
    s, t = rnd(2, 4, 7), rnd(2, 4, 7)
    clone_terms = {(i, name): torch.tensor(value(i, name), dtype=torch.float64) for i in layers for name in terms}
    return CloneOutput(s, t, clone_terms, TermRequest(terms=tuple(terms)), list(layers))


def test_lrc_loss_weighted_sum_by_hand():
    out = fake_output()
    ids = torch.randint(0, 7, (2, 4), generator=g)
    weights = {"q": 2.0, "gate": 0.5, "down": 3.0}
    cfg = LossConfig(w_ce=0.7, w_kl=0.3, alpha=0.25, temperature=2.0, term_weights=weights, clone_layers=[0, 2])
    r = LRCLoss(cfg)(out, ids)
    ce = next_token_cross_entropy(out.student_logits, ids).item()
    kl = loop_kl(out.student_logits, out.teacher_logits, 2.0).sum().item() / 2
    clone = sum(
        weights.get(name, 1.0) * (0.1 * (i + 1) + 0.01 * CLONE_TERMS.index(name)) for i in (0, 2) for name in CLONE_TERMS
    )
    assert r["ce"].item() == pytest.approx(ce)
    assert r["kl"].item() == pytest.approx(kl)
    assert r["clone"].item() == pytest.approx(clone)
    assert r["loss"].item() == pytest.approx(0.7 * ce + 0.3 * kl + 0.25 * clone)
    assert r["clone/up"].item() == pytest.approx(0.1 + 0.3 + 2 * 0.05)
    assert r["clone/up/2"].item() == pytest.approx(0.3 + 0.05)
    assert "clone/up/1" not in r


def test_zero_weight_terms_are_not_requested():
    assert LRCLoss(LossConfig(term_weights={"q": 0, "v": 0})).request.terms == ("k", "o", "gate", "up", "down")
    assert LRCLoss(LossConfig(alpha=0)).request.terms == ()
    out = fake_output(terms=())
    r = LRCLoss(LossConfig(alpha=0))(out, torch.zeros(2, 4, dtype=torch.long))
    assert r["clone"].item() == 0 and r["loss"].item() == pytest.approx(r["ce"].item() + r["kl"].item())


def test_output_computed_for_another_request_is_rejected():
    out = fake_output()  # teacher space
    with pytest.raises(ValueError, match="terms=loss_fn.request"):
        LRCLoss(LossConfig(attn_out_space="student"))(out, torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"term_weights": {"qq": 1.0}}, r"unknown terms \['qq'\]"),
        ({"kl_reduction": "sum"}, "kl_reduction must be one of"),
        ({"attn_out_space": "hidden"}, "attn_out_space must be one of"),
        ({"temperature": 0}, "temperature must be > 0"),
        ({"alpha": -1}, "alpha must be >= 0"),
        ({"clone_layers": []}, "clone_layers is empty"),
        ({"clone_layers": [1, 1]}, "duplicated"),
    ],
)
def test_bad_loss_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossConfig(**kwargs)


def test_clone_terms_match_hooks_on_teacher_and_exported_student():
    """Independent check: forward hooks on the HF teacher and on the exported student."""
    clone = make_clone("qwen2", rank=16)
    randomize_trainable(clone, std=0.2)
    from lrc.teachers import tiny_teacher

    teacher = tiny_teacher("qwen2")
    student = clone.to_hf()
    ids = random_ids(clone.arch.vocab_size, length=9)
    caught: dict[tuple[str, str, str], torch.Tensor] = {}

    def grab(tag, name, kind):
        def hook(module, args, output):
            caught[(tag, name, kind)] = (args[0] if kind == "in" else output).detach()

        return hook

    layer = 2
    for tag, model in (("t", teacher), ("s", student)):
        blk = model.model.layers[layer]
        for name, mod in (("q", blk.self_attn.q_proj), ("v", blk.self_attn.v_proj), ("gate", blk.mlp.gate_proj),
                          ("up", blk.mlp.up_proj), ("o", blk.self_attn.o_proj), ("down", blk.mlp.down_proj)):
            mod.register_forward_hook(grab(tag, name, "out"))
            mod.register_forward_hook(grab(tag, name, "in"))
    with torch.no_grad():
        teacher(ids)
        student(ids)
        out_t = clone(ids)
        out_s = clone(ids, terms=TermRequest(attn_out_space="student"))

    def mse(a, b):
        return ((a - b) ** 2).mean().item()

    for name in ("q", "v", "gate", "up"):
        assert out_t.clone_terms[(layer, name)].item() == pytest.approx(mse(caught[("s", name, "out")], caught[("t", name, "out")]), rel=1e-4)
    wo = teacher.model.layers[layer].self_attn.o_proj.weight
    po = dict(clone.named_projections())[f"layers.{layer}.o"]
    pdown = dict(clone.named_projections())[f"layers.{layer}.down"]
    assert out_t.clone_terms[(layer, "o")].item() == pytest.approx(
        mse(caught[("s", "o", "in")] @ wo.T, caught[("t", "o", "out")]), rel=1e-4
    )
    assert out_s.clone_terms[(layer, "o")].item() == pytest.approx(
        mse(caught[("s", "o", "out")], caught[("t", "o", "out")] @ po), rel=1e-4
    )
    assert out_t.clone_terms[(layer, "down")].item() == pytest.approx(
        mse(caught[("s", "down", "out")], caught[("t", "down", "out")] @ pdown), rel=1e-4
    )
