"""Paper Figure 3's "without alignment-free" variant (loss.output_alignment=learned): trainable
alignment matrices A (D x d) map the student's attention and FFN outputs to the teacher's width,
and the o / down terms become ||A y_s - y_t||^2 in teacher space. Training-only: never exported."""

from __future__ import annotations

import json

import pytest
import torch
from clone_utils import random_ids, randomize_trainable
from transformers import AutoModelForCausalLM

import lrc.model.layers as clone_layers
from lrc.losses import LossConfig, LRCLoss, TermRequest
from lrc.model import CloneConfig, LowRankClone
from lrc.teachers import tiny_teacher, tiny_tokenizer

LEARNED = LossConfig(output_alignment="learned")


def clone_pair(arch: str = "llama", **config):
    """Two clones of one teacher: alignment-free and learned, with the same projections and gains."""
    teacher = tiny_teacher(arch)
    free = LowRankClone.from_teacher(teacher, CloneConfig(rank=16, **config), tokenizer=tiny_tokenizer())
    learned = LowRankClone.from_teacher(
        teacher, CloneConfig(rank=16, **config), tokenizer=tiny_tokenizer(), output_alignment="learned"
    )
    randomize_trainable(free)
    learned.load_trainable_state_dict({**free.trainable_state_dict(), **dict(learned.named_alignments())})
    return free, learned


def test_alignment_matrices_exist_only_when_learned():
    free, learned = clone_pair(layers=[0, 2])
    assert list(free.named_alignments()) == [] and not any("align" in n for n in free.state_dict())
    names = [n for n, _ in learned.named_alignments()]
    assert names == ["layers.0.align_o", "layers.0.align_down", "layers.2.align_o", "layers.2.align_down"]
    for _, a in learned.named_alignments():
        assert a.shape == (64, 16) and a.requires_grad  # D x d: student width d -> teacher width D
        assert abs(a.std().item() - 0.02) < 0.005  # N(0, init_std), as the reference code's extra aligners
    trainable = dict(learned.named_trainable())
    assert set(names) <= set(trainable) and set(names).isdisjoint(dict(learned.named_projections()))
    # the projections are the alignment-free clone's (the aligners are drawn after them)
    fresh_free = LowRankClone.from_teacher(tiny_teacher("llama"), CloneConfig(rank=16, layers=[0, 2]))
    fresh_learned = LowRankClone.from_teacher(
        tiny_teacher("llama"), CloneConfig(rank=16, layers=[0, 2]), output_alignment="learned"
    )
    for (n, p), (m, q) in zip(fresh_free.named_projections(), fresh_learned.named_projections()):
        assert n == m and torch.equal(p, q)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_output_terms_equal_the_hand_computed_aligned_mse(arch, monkeypatch):
    """o and down = mean over tokens and D features of (y_s A^T - y_t)^2, y_s the student's output
    (width d) and y_t the teacher's (width D); q, k, v, gate and up are unchanged."""
    free, learned = clone_pair(arch)
    with torch.no_grad():
        for _, a in learned.named_alignments():
            a.normal_(0, 0.3)
    seen = {}
    real = clone_layers.layer_clone_terms

    def spy(student, teacher, request, **kw):
        seen[kw["layer"]] = (student, teacher)
        return real(student, teacher, request, **kw)

    monkeypatch.setattr(clone_layers, "layer_clone_terms", spy)
    ids = random_ids(learned.arch.vocab_size)
    loss_fn = LRCLoss(LEARNED)
    with torch.no_grad():
        out = learned(ids, terms=loss_fn.request)
        out_free = free(ids)
    for layer in learned.layers:
        s, t = seen[layer.index]
        for name in ("o", "down"):
            a = layer.align[name].double()
            expected = ((s[name].double() @ a.T - t[name].double()) ** 2).mean()
            assert s[name].shape[-1] == 16 and t[name].shape[-1] == 64
            assert out.clone_terms[(layer.index, name)].item() == pytest.approx(expected.item(), rel=1e-6)
        for name in ("q", "k", "v", "gate", "up"):
            assert torch.equal(out.clone_terms[(layer.index, name)], out_free.clone_terms[(layer.index, name)])
    assert torch.equal(out.student_logits, out_free.student_logits)  # the aligners never touch the student


def test_gradients_reach_the_alignment_matrices_and_only_through_the_output_terms():
    _, learned = clone_pair()
    ids = random_ids(learned.arch.vocab_size)
    LRCLoss(LossConfig(alpha=0.5, output_alignment="learned"))(learned(ids, terms=LRCLoss(LEARNED).request), ids)[
        "loss"
    ].backward()
    for name, a in learned.named_alignments():
        assert a.grad is not None and a.grad.abs().sum() > 0, name
    learned.zero_grad()
    no_outputs = LRCLoss(LossConfig(term_weights={"o": 0, "down": 0}, output_alignment="learned"))
    no_outputs(learned(ids, terms=no_outputs.request), ids)["loss"].backward()
    assert all(a.grad is None or a.grad.abs().sum() == 0 for _, a in learned.named_alignments())


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_export_is_unchanged_in_shape_and_parity(tmp_path, arch):
    """The aligners are training-only: the learned clone exports exactly the alignment-free clone's
    model (same files, same tensors), whose logits equal the training forward."""
    free, learned = clone_pair(arch)
    a = learned.save_student(tmp_path / "learned")
    b = free.save_student(tmp_path / "free")
    sa = AutoModelForCausalLM.from_pretrained(a).eval()
    sb = AutoModelForCausalLM.from_pretrained(b).eval()
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    state_a, state_b = sa.state_dict(), sb.state_dict()
    assert state_a.keys() == state_b.keys() and all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert not any("align" in k for k in state_a)
    ids = random_ids(learned.arch.vocab_size, length=20)
    with torch.no_grad():
        assert (sa(ids).logits - learned(ids, terms=LRCLoss(LEARNED).request).student_logits).abs().max() <= 1e-4


def test_alignment_settings_are_checked():
    with pytest.raises(ValueError, match=r"LossConfig.output_alignment must be one of \('free', 'learned'\)"):
        LossConfig(output_alignment="fixed")
    with pytest.raises(ValueError, match=r"output_alignment='learned' compares in teacher space: .*attn_out_space"):
        LossConfig(output_alignment="learned", attn_out_space="student")
    with pytest.raises(ValueError, match=r"output_alignment='learned' .* detach_down_target"):
        LossConfig(output_alignment="learned", detach_down_target=True)
    free, _ = clone_pair()
    with pytest.raises(ValueError, match=r"no alignment matrices: build it with output_alignment='learned'"):
        free(random_ids(free.arch.vocab_size), terms=LRCLoss(LEARNED).request)
    with pytest.raises(ValueError, match="output_alignment must be one of"):
        LowRankClone.from_teacher(tiny_teacher("llama"), CloneConfig(rank=8), output_alignment="yes")
    assert not TermRequest().covers(TermRequest(output_alignment="learned"), [0, 1])


def test_lrc_distill_trains_checkpoints_and_exports_the_aligners(tmp_path):
    """Through the real CLI (tiny teacher, 2 steps): the aligners train with the optimizer, the
    checkpoint holds them and their Adam state, lrc-export restores the run from the checkpoint
    alone and writes the same plain model as the run's own export, with no aligner in it."""
    from test_cli import compose_cfg, tiny_overrides, write_corpus

    from lrc.cli.distill import run
    from lrc.cli.export import export_checkpoint

    corpus = write_corpus(tmp_path / "corpus.jsonl")
    out = tmp_path / "run"
    cfg = compose_cfg(tiny_overrides(corpus, out, "loss.output_alignment=learned", "student.layers={last: 2}",
                                     "trainer.max_steps=2", "validate_before=false", "logger=none"))
    run(cfg)
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    aligners = sorted(k for k in ckpt["state_dict"] if ".align." in k)
    assert [k.split("layers.")[1] for k in aligners] == ["2.align.down", "2.align.o", "3.align.down", "3.align.o"]
    assert all(ckpt["state_dict"][k].shape == (64, 16) for k in aligners)
    # every trainable tensor, the aligners included, has Adam state after 2 steps
    n_trainable = len(ckpt["lrc"]["trainable_keys"])
    assert sum(len(g["params"]) for g in ckpt["optimizer_states"][0]["param_groups"]) == n_trainable
    assert len(ckpt["optimizer_states"][0]["state"]) == n_trainable
    again = export_checkpoint(out / "checkpoints" / "last.ckpt", tmp_path / "again")
    a = AutoModelForCausalLM.from_pretrained(out / "student")
    b = AutoModelForCausalLM.from_pretrained(again)
    assert a.config.num_hidden_layers == 2 and not any("align" in k for k in a.state_dict())
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
