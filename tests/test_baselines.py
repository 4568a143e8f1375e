"""The baselines' model and loss pieces (lrc.methods): plain student shape, KD and TinyBERT."""

from __future__ import annotations

import json
import math

import pytest
import torch
from clone_utils import ARCHS, random_ids
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from lrc.methods.kd import KDModel, kd_loss
from lrc.methods.students import plain_student_config, random_student
from lrc.methods.tinybert import TinyBERTModel, attention_mse_terms, hidden_mse_terms, tinybert_loss
from lrc.model import CloneConfig, LowRankClone
from lrc.model.export import student_config
from lrc.teachers import tiny_teacher, tiny_tokenizer

METHODS = {"kd": KDModel, "tinybert": TinyBERTModel}
_VOLATILE = ("transformers_version", "_name_or_path")


def _cfg_dict(config) -> dict:
    d = config.to_dict()
    for key in _VOLATILE:
        d.pop(key, None)
    return d


def _mask(batch: int, length: int, valid: list[int]) -> torch.Tensor:
    return torch.tensor([[1] * n + [0] * (length - n) for n in valid], dtype=torch.long)[:batch]


# ------------------------------------------------------------------------------- plain student
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "rank,layers,tied,tie_proj,eps",
    [
        (24, None, True, None, None),
        (64, [1, 3], False, None, 1e-5),
        (8, [2], True, False, None),
        (40, [0, 2], True, None, 3e-6),
    ],
)
def test_plain_student_config_equals_lrc_export(arch, rank, layers, tied, tie_proj, eps):
    teacher = tiny_teacher(arch, tie_word_embeddings=tied)
    clone = LowRankClone.from_teacher(
        teacher, CloneConfig(rank=rank, layers=layers, tie_head_projection=tie_proj, rms_norm_eps=eps)
    )
    expected = _cfg_dict(student_config(clone))
    explicit = plain_student_config(
        teacher.config, rank, clone.student_layers, clone.student_eps, clone.io.student_tied
    )
    assert _cfg_dict(explicit) == expected
    if tie_proj is None:  # the defaults are the LRC export's defaults
        kept = None if layers is None else list(reversed(layers))
        assert _cfg_dict(plain_student_config(teacher.config, rank, kept, eps)) == expected


def test_plain_student_config_rejects_bad_input():
    config = tiny_teacher("llama").config
    for rank in (0, 65, 2.0, True):
        with pytest.raises(ValueError, match=r"rank must be an integer in \[1, 64\]"):
            plain_student_config(config, rank)
    for layers in ([], [4], [1, 1], [-1]):
        with pytest.raises(ValueError, match=r"kept_layers must be distinct .* \[0, 3\]"):
            plain_student_config(config, 16, layers)
    with pytest.raises(ValueError, match="init_std must be > 0"):
        random_student(config, 16, init_std=0)


def test_random_student_is_seeded_and_uses_init_std():
    config = tiny_teacher("qwen2").config
    state = torch.random.get_rng_state()
    a, b = random_student(config, 32, seed=5), random_student(config, 32, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = random_student(config, 32, seed=6)
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight)

    def std(model):
        return model.model.layers[1].mlp.gate_proj.weight.std().item()

    assert std(a) == pytest.approx(config.initializer_range, rel=0.05)  # transformers' own init
    wide = random_student(config, 32, seed=5, init_std=0.5)
    assert std(wide) == pytest.approx(0.5, rel=0.05)
    assert wide.config.initializer_range == config.initializer_range
    assert torch.equal(wide.model.norm.weight, torch.ones(32))
    q_bias = wide.model.layers[0].self_attn.q_proj.bias
    assert torch.equal(q_bias, torch.zeros_like(q_bias))


# ------------------------------------------------------------------------------------ losses
def _hand_ce(logits, labels):
    total, n = 0.0, 0
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1] - 1):
            y = int(labels[b, t + 1])
            if y == -100:
                continue
            row = logits[b, t]
            total += math.log(sum(math.exp(v) for v in row.tolist())) - row[y].item()
            n += 1
    return total / n


def _hand_kl(s, t, tau, reduction, tau2, mask):
    total, n = 0.0, 0
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            if mask is not None and not mask[b, i]:
                continue
            ps = torch.exp(s[b, i] / tau) / torch.exp(s[b, i] / tau).sum()
            pt = torch.exp(t[b, i] / tau) / torch.exp(t[b, i] / tau).sum()
            total += sum(p * (math.log(p) - math.log(q)) for p, q in zip(pt.tolist(), ps.tolist()))
            n += 1
    kl = total / s.shape[0] if reduction == "sequence_sum" else total / n
    return kl * tau**2 if tau2 else kl


@pytest.mark.parametrize(
    "reduction,tau2,masked", [("sequence_sum", False, False), ("token_mean", True, True), ("sequence_sum", False, True)]
)
def test_kd_loss_matches_hand_computation(reduction, tau2, masked):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 7, generator=g, dtype=torch.float64) * 3
    t = torch.randn(2, 5, 7, generator=g, dtype=torch.float64) * 3
    ids = torch.randint(0, 7, (2, 5), generator=g)
    mask = _mask(2, 5, [5, 3]).bool() if masked else None
    got = kd_loss(
        s, t, ids, token_mask=mask, w_ce=0.7, w_kl=1.3, temperature=2.0, kl_reduction=reduction, kl_tau_squared=tau2
    )
    labels = ids if mask is None else ids.masked_fill(~mask, -100)
    ce, kl = _hand_ce(s, labels), _hand_kl(s, t, 2.0, reduction, tau2, mask)
    assert got["ce"].item() == pytest.approx(ce, rel=1e-9)
    assert got["kl"].item() == pytest.approx(kl, rel=1e-9)
    assert got["loss"].item() == pytest.approx(0.7 * ce + 1.3 * kl, rel=1e-9)
    with pytest.raises(ValueError, match="w_kl must be >= 0"):
        kd_loss(s, t, ids, w_kl=-1)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        kd_loss(s, t, ids, temperature=0)


def test_tinybert_terms_match_explicit_loops():
    g = torch.Generator().manual_seed(1)
    b, t, d, big_d, h = 2, 4, 3, 5, 2
    mask = _mask(b, t, [4, 2]).bool()
    hs = [torch.randn(b, t, d, generator=g, dtype=torch.float64) for _ in range(3)]
    ht = [torch.randn(b, t, big_d, generator=g, dtype=torch.float64) for _ in range(3)]
    maps = [torch.randn(big_d, d, generator=g, dtype=torch.float64) for _ in range(3)]
    a_s = [torch.rand(b, h, t, t, generator=g, dtype=torch.float64) for _ in range(2)]
    a_t = [torch.rand(b, h, t, t, generator=g, dtype=torch.float64) for _ in range(2)]
    for m in (None, mask):
        valid = [(i, j) for i in range(b) for j in range(t) if m is None or m[i, j]]
        got = hidden_mse_terms(hs, ht, maps, m)
        for k in range(3):
            sq = sum(
                (sum(maps[k][o, c].item() * hs[k][i, j, c].item() for c in range(d)) - ht[k][i, j, o].item()) ** 2
                for i, j in valid for o in range(big_d)
            )
            assert got[k].item() == pytest.approx(sq / (len(valid) * big_d), rel=1e-9)
        got = attention_mse_terms(a_s, a_t, m)
        for k in range(2):
            sq = sum((a_s[k][i, hh, j, c].item() - a_t[k][i, hh, j, c].item()) ** 2
                     for i, j in valid for hh in range(h) for c in range(t))
            assert got[k].item() == pytest.approx(sq / (len(valid) * h * t), rel=1e-9)


def test_tinybert_loss_sums_weighted_terms():
    teacher = tiny_teacher("llama")
    model = TinyBERTModel.from_teacher(teacher, 16, [1, 3])
    ids = random_ids(teacher.config.vocab_size, length=9)
    out = model(ids)
    r = tinybert_loss(out, ids, w_ce=0.5, w_kl=2.0, w_hidden=3.0, w_attn=4.0, temperature=2.0)
    hidden = hidden_mse_terms(out.student_hidden, out.teacher_hidden, model.map_weights())
    attn = attention_mse_terms(out.student_attn, out.teacher_attn)
    assert sorted(k for k in r if k.startswith("tinybert/")) == sorted(
        ["tinybert/hidden/embed", "tinybert/hidden/1", "tinybert/hidden/3", "tinybert/attn/1", "tinybert/attn/3"]
    )
    assert r["tinybert/hidden/3"].item() == pytest.approx(hidden[2].item())
    assert r["hidden"].item() == pytest.approx(sum(v.item() for v in hidden))
    assert r["attn"].item() == pytest.approx(sum(v.item() for v in attn))
    kd = kd_loss(out.student_logits, out.teacher_logits, ids, w_ce=0.5, w_kl=2.0, temperature=2.0)
    expected = kd["loss"] + 3.0 * r["hidden"] + 4.0 * r["attn"]
    assert r["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="features=True"):
        tinybert_loss(model(ids, features=False), ids)


# ------------------------------------------------------------------------------------ models
def _teacher_attention_by_hand(teacher, hidden_in, layer, positions):
    """Causal attention probabilities of one teacher layer from its q/k projections (GQA by hand)."""
    lay, c = teacher.model.layers[layer], teacher.config
    b, t, _ = hidden_in.shape
    x = lay.input_layernorm(hidden_in)
    q = lay.self_attn.q_proj(x).view(b, t, c.num_attention_heads, c.head_dim)
    k = lay.self_attn.k_proj(x).view(b, t, c.num_key_value_heads, c.head_dim)
    if hasattr(lay.self_attn, "q_norm"):
        q, k = lay.self_attn.q_norm(q), lay.self_attn.k_norm(k)
    cos, sin = teacher.model.rotary_emb(x, positions)
    q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    group = c.num_attention_heads // c.num_key_value_heads
    probs = torch.empty(b, c.num_attention_heads, t, t)
    for head in range(c.num_attention_heads):
        scores = q[:, head] @ k[:, head // group].transpose(-1, -2) / math.sqrt(c.head_dim)
        scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
        probs[:, head] = scores.softmax(-1)
    return probs


@pytest.mark.parametrize("arch", ARCHS)
def test_tinybert_features_are_the_mapped_layers(arch):
    teacher = tiny_teacher(arch)
    model = TinyBERTModel.from_teacher(teacher, 16, [0, 2])
    ids = random_ids(teacher.config.vocab_size, length=10)
    out = model(ids)
    with torch.no_grad():
        ref = teacher(ids, output_hidden_states=True)  # [embeddings, output of layer 0, ...]
        student_ref = model.student(ids, output_hidden_states=True)
    for j, i in enumerate([0, 2]):
        assert torch.allclose(out.teacher_hidden[j + 1], ref.hidden_states[i + 1], atol=1e-6)
        positions = torch.arange(10).expand(2, 10)
        by_hand = _teacher_attention_by_hand(teacher, ref.hidden_states[i], i, positions)
        assert torch.allclose(out.teacher_attn[j], by_hand, atol=1e-5)
    assert torch.equal(out.teacher_hidden[0], ref.hidden_states[0])
    assert torch.allclose(out.student_hidden[1], student_ref.hidden_states[1], atol=1e-6)
    assert [tuple(a.shape) for a in out.student_attn] == [(2, teacher.config.num_attention_heads, 10, 10)] * 2
    assert len(out.hidden_maps) == 3 and out.hidden_maps[0].shape == (64, 16)
    shared = TinyBERTModel.from_teacher(teacher, 16, [0, 2], shared_map=True)
    assert len(shared.maps) == 1 and all(w is shared.maps[0].weight for w in shared.map_weights())


@pytest.mark.parametrize("method", METHODS)
def test_packed_documents_and_padding_match_separate_runs(method):
    teacher = tiny_teacher("qwen3")
    model = METHODS[method].from_teacher(teacher, 16).eval()
    ids = random_ids(teacher.config.vocab_size, batch=1, length=12)
    seg = torch.tensor([[0] * 5 + [1] * 7])
    out = model(ids, segment_ids=seg)
    alone = model(ids[:, 5:])
    assert torch.allclose(out.student_logits[:, 5:], alone.student_logits, atol=1e-5)
    assert torch.allclose(out.teacher_logits[:, 5:], alone.teacher_logits, atol=1e-5)
    if method == "tinybert":  # no attention across the document boundary
        assert out.teacher_attn[0][0, :, 5:, :5].abs().max() == 0
    mask = _mask(1, 12, [8])
    padded = model(ids, mask)
    assert torch.equal(padded.token_mask, mask.bool())
    short = model(ids[:, :8])
    assert torch.allclose(padded.student_logits[:, :8], short.student_logits, atol=1e-5)
    assert model(ids).token_mask is None


def _tracked(method, model, ids):
    """The loss to step on and the terms that must fall: CE + KL for KD; the TinyBERT terms alone
    (so the test sees them train, not the CE that dominates a tiny random model)."""
    out = model(ids)
    if method == "kd":
        r = kd_loss(out.student_logits, out.teacher_logits, ids, temperature=2.0)
        return r["loss"], {"loss": r["loss"].item()}
    r = tinybert_loss(out, ids, w_ce=0.0, w_kl=0.0, w_hidden=1.0, w_attn=1.0)
    return r["loss"], {"hidden": r["hidden"].item(), "attn": r["attn"].item()}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_training_steps_reduce_loss_and_leave_teacher_alone(method, arch):
    teacher = tiny_teacher(arch)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    model = METHODS[method].from_teacher(teacher, 16, [1, 2], seed=1).train()
    assert not teacher.training
    names = [n for n, _ in model.named_trainable()]
    assert names and not any(n.startswith("teacher.") for n in names)
    assert any(n.startswith("maps.") for n in names) == (method == "tinybert")
    opt = torch.optim.Adam([p for _, p in model.named_trainable()], lr=1e-2 if method == "kd" else 3e-3)
    ids = random_ids(teacher.config.vocab_size, length=16)
    history = []
    for _ in range(6):
        loss, values = _tracked(method, model, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(values)
    for key in history[0]:
        assert history[-1][key] < (0.9 if method == "kd" else 0.95) * history[0][key], (key, history)
    assert all(p.grad is None for p in teacher.parameters())
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    restored = METHODS[method].from_teacher(tiny_teacher(arch), 16, [1, 2], seed=1)
    restored.load_trainable_state_dict(model.trainable_state_dict())
    assert torch.equal(restored(ids).student_logits, model(ids).student_logits)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_save_student_reloads_and_matches_training_forward(tmp_path, method, arch):
    tied = arch != "qwen2"
    teacher = tiny_teacher(arch, tie_word_embeddings=tied)
    model = METHODS[method].from_teacher(teacher, 24, [0, 3], seed=2, init_std=0.2, tokenizer=tiny_tokenizer())
    ids = random_ids(teacher.config.vocab_size, length=14)
    path = model.save_student(tmp_path / "student")
    student = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        expected = model(ids).student_logits
        got = student(ids).logits
    assert (got - expected).abs().max() <= 1e-5
    assert type(student).__name__ == type(teacher).__name__
    want = _cfg_dict(plain_student_config(teacher.config, 24, [0, 3]))
    have = _cfg_dict(AutoConfig.from_pretrained(path))
    assert {k: have[k] for k in want if k not in ("architectures", "dtype")} == {
        k: v for k, v in want.items() if k not in ("architectures", "dtype")
    }
    assert (student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()) == tied
    assert AutoTokenizer.from_pretrained(path).chat_template == tiny_tokenizer().chat_template
    meta = json.loads((path / "lrc_student.json").read_text())
    assert meta["method"] == method and meta["student_layers"] == [0, 3] and meta["rank"] == 24
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]  # no temporary directory left
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.save_student(path)
    model.save_student(path, overwrite=True, dtype=torch.bfloat16)
    assert AutoModelForCausalLM.from_pretrained(path).dtype == torch.bfloat16
    assert next(model.student.parameters()).dtype == torch.float32  # the training student is not cast


def test_save_student_refuses_non_finite_weights(tmp_path):
    model = KDModel.from_teacher(tiny_teacher("llama"), 16)
    with torch.no_grad():
        model.student.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite weights in \['model.layers.1.mlp.down_proj.weight'\]"):
        model.save_student(tmp_path / "student")
    assert list(tmp_path.iterdir()) == []
