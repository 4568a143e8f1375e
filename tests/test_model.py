"""The clone's forward: rotation equivalence, teacher fidelity, orientation, layers, trainability."""

from __future__ import annotations

import pytest
import torch
from clone_utils import ARCHS, make_clone, random_ids, randomize_trainable

from lrc.losses import LossConfig, LRCLoss, TermRequest
from lrc.model import CloneConfig, LowRankClone
from lrc.teachers import tiny_teacher


def random_orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, _ = torch.linalg.qr(g)
    return q.float()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("sharing", ["all", "io"])
@pytest.mark.parametrize("tie_head_projection", [None, False])
def test_rotation_equivalence(arch, sharing, tie_head_projection):
    """rank = D, every P = one random orthogonal Q, gains 1: the student *is* the teacher."""
    teacher = tiny_teacher(arch, unit_norms=True)
    d = teacher.config.hidden_size
    clone = LowRankClone.from_teacher(
        teacher,
        CloneConfig(rank=d, attn_sharing=sharing, ffn_sharing=sharing, tie_head_projection=tie_head_projection),
    )
    q = random_orthogonal(d)
    assert not torch.allclose(q, torch.eye(d), atol=0.1)
    with torch.no_grad():
        for _, p in clone.named_projections():
            p.copy_(q)
    ids = random_ids(teacher.config.vocab_size, length=20)
    out = clone(ids)
    ref = teacher(ids).logits
    assert (out.teacher_logits - ref).abs().max() <= 1e-5
    assert (out.student_logits - ref).abs().max() <= 1e-4
    terms = LRCLoss(LossConfig())(out, ids)
    assert len(out.clone_terms) == 7 * teacher.config.num_hidden_layers
    assert max(v.item() for v in out.clone_terms.values()) < 1e-9
    assert abs(terms["kl"].item()) < 1e-6
    # CE equals the teacher's own next-token CE
    ce_ref = torch.nn.functional.cross_entropy(ref[:, :-1].reshape(-1, ref.shape[-1]), ids[:, 1:].reshape(-1))
    assert abs(terms["ce"].item() - ce_ref.item()) < 1e-4


def test_rotation_breaks_when_one_projection_is_transposed():
    """Sanity check of the test above: a transposed (non-symmetric) projection is detected."""
    teacher = tiny_teacher("llama", unit_norms=True)
    d = teacher.config.hidden_size
    clone = LowRankClone.from_teacher(teacher, CloneConfig(rank=d))
    q = random_orthogonal(d)
    with torch.no_grad():
        for name, p in clone.named_projections():
            p.copy_(q.t() if name == "layers.1.up" else q)
    ids = random_ids(teacher.config.vocab_size)
    out = clone(ids)
    assert (out.student_logits - out.teacher_logits).abs().max() > 1e-2
    assert out.clone_terms[(1, "up")] > 1e-4 and out.clone_terms[(0, "up")] < 1e-9


@pytest.mark.parametrize("arch", ARCHS)
def test_teacher_stream_matches_transformers(arch):
    """Non-unit norms and (for llama) Llama-3 rope scaling: the teacher stream is the teacher."""
    teacher = tiny_teacher(arch, seed=3)
    clone = LowRankClone.from_teacher(teacher, CloneConfig(rank=8))
    ids = random_ids(teacher.config.vocab_size, length=100)  # > original rope context (64)
    assert (clone(ids).teacher_logits - teacher(ids).logits).abs().max() <= 1e-5


def test_padding_matches_transformers():
    teacher = tiny_teacher("qwen2", seed=1)
    clone = LowRankClone.from_teacher(teacher, CloneConfig(rank=8))
    ids = random_ids(teacher.config.vocab_size, length=10)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0  # right padding in row 0
    out = clone(ids, attention_mask=mask)
    ref = teacher(ids, attention_mask=mask).logits
    valid = mask.bool()
    assert (out.teacher_logits[valid] - ref[valid]).abs().max() <= 1e-5
    assert out.token_mask is not None and out.token_mask.sum() == 17


def test_document_mask_equals_separate_documents():
    """segment_ids: each packed document behaves exactly as if it were run on its own."""
    teacher = tiny_teacher("llama", seed=2)
    clone = LowRankClone.from_teacher(teacher, CloneConfig(rank=16))
    randomize_trainable(clone)
    ids = random_ids(teacher.config.vocab_size, batch=1, length=15)
    seg = torch.tensor([[0] * 6 + [1] * 4 + [2] * 5])
    packed = clone(ids, segment_ids=seg)
    start = 0
    for n in (6, 4, 5):
        alone = clone(ids[:, start : start + n])
        for attr in ("teacher_logits", "student_logits"):
            diff = getattr(packed, attr)[:, start : start + n] - getattr(alone, attr)
            assert diff.abs().max() <= 1e-4, attr
        start += n
    # without the mask the second document does see the first
    plain = clone(ids)
    assert (plain.teacher_logits[:, 6:10] - packed.teacher_logits[:, 6:10]).abs().max() > 1e-3


@pytest.mark.parametrize("attn_sharing,ffn_sharing", [("all", "all"), ("io", "all"), ("all", "io"), ("io", "io")])
@pytest.mark.parametrize("teacher_tied", [True, False])
def test_projection_names_shapes_and_orientation(attn_sharing, ffn_sharing, teacher_tied):
    clone = make_clone(
        "qwen3",
        rank=16,
        attn_sharing=attn_sharing,
        ffn_sharing=ffn_sharing,
        teacher_kwargs={"tie_word_embeddings": teacher_tied, "num_layers": 2},
    )
    names = [n for n, _ in clone.named_projections()]
    attn = ["q", "k", "v"] if attn_sharing == "all" else ["qkv"]
    ffn = ["gate", "up"] if ffn_sharing == "all" else ["gate_up"]
    per_layer = attn + ffn + ["o", "down"]
    expected = ["embed"] + ([] if teacher_tied else ["head"])
    expected += [f"layers.{i}.{n}" for i in range(2) for n in per_layer]
    assert sorted(names) == sorted(expected)
    for _, p in clone.named_projections():
        assert p.shape == (64, 16) and p.requires_grad
    # orientation: input side W_t @ P, output side P.T @ W_t, embedding E @ P
    layer = clone.layers[1]
    w, t = layer.student_weights(), layer.teacher
    proj = dict(clone.named_projections())
    owner = {
        "wq": "q" if attn_sharing == "all" else "qkv",
        "wk": "k" if attn_sharing == "all" else "qkv",
        "wv": "v" if attn_sharing == "all" else "qkv",
        "wgate": "gate" if ffn_sharing == "all" else "gate_up",
        "wup": "up" if ffn_sharing == "all" else "gate_up",
    }
    for key, name in owner.items():
        assert torch.equal(w[key], t[key] @ proj[f"layers.1.{name}"]), key
    assert torch.equal(w["wo"], proj["layers.1.o"].t() @ t["wo"])
    assert torch.equal(w["wdown"], proj["layers.1.down"].t() @ t["wdown"])
    assert torch.equal(w["q_norm"], t["q_norm"])  # Qwen3 head norms are copied unchanged
    assert w["wq"].shape == (4 * 24, 16) and w["wo"].shape == (16, 4 * 24)
    merged = clone.io.merged()
    assert torch.equal(merged["embed"], clone.io.teacher_embed @ clone.io.proj_embed)
    assert clone.io.student_tied == teacher_tied


def test_default_head_projection_follows_teacher_tying():
    assert make_clone("llama", teacher_kwargs={"tie_word_embeddings": True}).io.proj_head is None
    assert make_clone("llama", teacher_kwargs={"tie_word_embeddings": False}).io.proj_head is not None
    forced = make_clone("llama", tie_head_projection=False)
    assert forced.io.proj_head is not None and not forced.io.student_tied


def test_teacher_weights_are_shared_not_copied():
    teacher = tiny_teacher("llama")
    clone = LowRankClone.from_teacher(teacher, CloneConfig(rank=8))
    assert clone.layers[2].teacher["wq"].data_ptr() == teacher.model.layers[2].self_attn.q_proj.weight.data_ptr()
    assert clone.io.teacher_embed.data_ptr() == teacher.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("config,kept", [({"layers": [3, 0]}, [0, 3]), ({"layer_stride": 2}, [0, 2]), ({}, [0, 1, 2, 3])])
def test_layer_selection(config, kept):
    clone = make_clone("llama", rank=8, **config)
    assert clone.student_layers == kept
    assert [layer.index for layer in clone.layers if layer.is_student] == kept
    out = clone(random_ids(clone.arch.vocab_size))
    assert sorted({i for i, _ in out.clone_terms}) == kept
    assert {n.split(".")[1] for n, _ in clone.named_projections() if n.startswith("layers.")} == {str(i) for i in kept}


def test_skipped_layers_leave_student_stream_unchanged():
    """A student keeping layers [1] equals running only that layer's student weights."""
    from lrc.model.functional import decoder_layer, rms_norm

    clone = make_clone("llama", rank=8, layers=[1])
    randomize_trainable(clone)
    ids = random_ids(clone.arch.vocab_size)
    out = clone(ids)
    x = torch.nn.functional.embedding(ids, clone.io.merged()["embed"])
    cos, sin = clone.rotary(x, torch.arange(ids.shape[1])[None])
    layer = clone.layers[1]
    x, _ = decoder_layer(x, layer.student_weights(), layer.shape, cos, sin, None, layer.student_eps)
    logits = rms_norm(x, clone.io.student_final_norm, clone.student_eps) @ clone.io.merged()["head"].t()
    assert (out.student_logits - logits).abs().max() <= 1e-5


def test_only_requested_terms_are_computed():
    clone = make_clone("llama", rank=8)
    ids = random_ids(clone.arch.vocab_size)
    loss_fn = LRCLoss(LossConfig(term_weights={"q": 0, "k": 0, "v": 0, "o": 0, "up": 0}, clone_layers=[1, 3]))
    out = clone(ids, terms=loss_fn.request)
    assert set(out.clone_terms) == {(1, "gate"), (1, "down"), (3, "gate"), (3, "down")}
    assert clone(ids, terms=TermRequest(terms=())).clone_terms == {}


def test_trainability():
    clone = make_clone("qwen2", rank=16, teacher_kwargs={"tie_word_embeddings": False})
    randomize_trainable(clone, std=0.05)
    trainable = {id(p) for _, p in clone.named_trainable()}
    requires = {id(p) for p in clone.parameters() if p.requires_grad}
    assert trainable == requires
    n_proj = sum(1 for _ in clone.named_projections())
    assert n_proj == 2 + 4 * 7
    teacher_before = {n: p.detach().clone() for n, p in clone.named_parameters() if not p.requires_grad}
    assert len(teacher_before) > 0
    opt = torch.optim.Adam([p for p in clone.parameters() if p.requires_grad], lr=1e-2)
    ids = random_ids(clone.arch.vocab_size)
    loss = LRCLoss(LossConfig(alpha=0.5))(clone(ids), ids)["loss"]
    loss.backward()
    for name, p in clone.named_trainable():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    opt.step()
    for n, p in clone.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, teacher_before[n]), n
            assert p.grad is None


def test_init_is_reference_normal_and_seeded():
    a = make_clone("llama", rank=32, teacher_kwargs={"num_layers": 2})
    b = make_clone("llama", rank=32, teacher_kwargs={"num_layers": 2})
    c = make_clone("llama", rank=32, seed=1, teacher_kwargs={"num_layers": 2})
    pa, pb, pc = (torch.cat([p.flatten() for _, p in m.named_projections()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert abs(pa.std().item() - 0.02) < 0.001 and abs(pa.mean().item()) < 0.001
    for _, g in a.named_student_norms():
        assert torch.equal(g, torch.ones_like(g))


def test_custom_init_hook_sees_teacher_weights():
    seen = {}

    def hook(param, ctx):
        seen[ctx.name] = (ctx.side, sorted(ctx.teacher_weights))
        with torch.no_grad():
            param.fill_(0.5)

    clone = make_clone("llama", rank=8, init=hook, attn_sharing="io", teacher_kwargs={"num_layers": 1})
    assert seen["layers.0.qkv"] == ("input", ["wk", "wq", "wv"])
    assert seen["layers.0.down"] == ("output", ["wdown"])
    assert seen["embed"] == ("embedding", ["embed"])
    assert all(torch.all(p == 0.5) for _, p in clone.named_projections())


def test_trainable_state_roundtrip():
    a, b = make_clone("llama", rank=8), make_clone("llama", rank=8, seed=5)
    randomize_trainable(a)
    b.load_trainable_state_dict(a.trainable_state_dict())
    ids = random_ids(a.arch.vocab_size)
    assert torch.equal(a(ids).student_logits, b(ids).student_logits)
    with pytest.raises(ValueError, match="mismatch"):
        make_clone("llama", rank=8, layers=[0]).load_trainable_state_dict(a.trainable_state_dict())


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "config,match",
    [
        ({"rank": 0}, r"rank must be an integer in \[1, 64\]"),
        ({"rank": 65}, r"rank must be an integer in \[1, 64\]"),
        ({"rank": 8, "layers": [0, 4]}, r"CloneConfig.layers has indices out of range \[-4, 3\] \(4 layers\): \[4\]"),
        ({"rank": 8, "layers": [1, 1]}, "duplicated indices: \\[1\\]"),
        ({"rank": 8, "layers": []}, "layers is empty"),
        ({"rank": 8, "layers": [0], "layer_stride": 2}, "at most one of"),
        ({"rank": 8, "layer_stride": 0}, "layer_stride must be"),
        ({"rank": 8, "attn_sharing": "some"}, "attn_sharing must be one of"),
        ({"rank": 8, "init": "pca?"}, "unknown CloneConfig.init"),
    ],
)
def test_bad_clone_config(config, match):
    with pytest.raises(ValueError, match=match):
        LowRankClone.from_teacher(tiny_teacher("llama"), CloneConfig(**config))


def test_unsupported_teachers():
    from transformers import LlamaModel, MistralConfig, MistralForCausalLM

    mistral = MistralForCausalLM(
        MistralConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    )
    with pytest.raises(ValueError, match=r"unsupported teacher architecture 'mistral'.*LlamaForCausalLM"):
        LowRankClone.from_teacher(mistral, CloneConfig(rank=8))
    base = LlamaModel(tiny_teacher("llama").config)
    with pytest.raises(ValueError, match="causal LM"):
        LowRankClone.from_teacher(base, CloneConfig(rank=8))
    with pytest.raises(ValueError, match="causal LM"):
        LowRankClone.from_teacher("not a model", CloneConfig(rank=8))


def test_clone_layers_must_be_kept_layers():
    clone = make_clone("llama", rank=8, layers=[0, 2])
    loss_fn = LRCLoss(LossConfig(clone_layers=[1]))
    with pytest.raises(ValueError, match=r"\[1\] are not kept"):
        clone(random_ids(clone.arch.vocab_size), terms=loss_fn.request)
    with pytest.raises(ValueError, match=r"\[1\] are not layers the student keeps"):
        loss_fn.check_layers(clone.student_layers)


def test_bf16_teacher_keeps_fp32_master_projections(tmp_path):
    """A bf16 teacher computes in bf16 while projections and gains stay fp32 (no autocast needed)."""
    teacher = tiny_teacher("qwen2").to(torch.bfloat16)
    clone = LowRankClone.from_teacher(teacher, CloneConfig(rank=16))
    assert all(p.dtype == torch.float32 for _, p in clone.named_trainable())
    assert clone.layers[0].teacher["wq"].dtype == torch.bfloat16
    ids = random_ids(clone.arch.vocab_size)
    out = clone(ids)
    assert out.student_logits.dtype == torch.bfloat16
    loss = LRCLoss(LossConfig())(out, ids)["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for _, p in clone.named_trainable())
    student = clone.to_hf()
    assert next(student.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        assert (student(ids).logits.float() - clone(ids).student_logits.float()).abs().max() < 0.1
    same_dtype = LowRankClone.from_teacher(teacher, CloneConfig(rank=16, param_dtype="teacher"))
    assert all(p.dtype == torch.bfloat16 for _, p in same_dtype.named_trainable())
    with pytest.raises(ValueError, match="param_dtype must be one of"):
        LowRankClone.from_teacher(teacher, CloneConfig(rank=16, param_dtype="fp8"))
