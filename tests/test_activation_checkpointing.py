"""Activation checkpointing of clone layers (``trainer.strategy.activation_checkpointing``): "full"
recomputes both streams of a layer in backward, "student" runs the frozen teacher layer once and
recomputes only the student stream against the kept clone-term targets. Both give the values and
gradients of keeping every activation; the 2-process FSDP2 runs of test_distributed.py use them too."""

from __future__ import annotations

import pytest
import torch
from clone_utils import make_clone, random_ids, randomize_trainable
from torch import nn

import lrc.model.layers as layers_mod
from lrc.model import CloneConfig, LowRankClone
from lrc.teachers import tiny_teacher
from lrc.losses import (
    ACTIVATION_KEYS,
    LossConfig,
    LRCLoss,
    masked_mse,
    register_clone_term,
    teacher_activations_read,
)
from lrc.model.checkpointing import apply_activation_checkpointing, checkpointing_mode
from lrc.training.distributed import FSDP2Strategy, sharding_units


def loss_and_grads(arch: str, mode: str, *, packed: bool = True, **clone_config):
    """Loss, its terms and the trainable tensors' gradients of one float64 step of a tiny clone."""
    clone = LowRankClone.from_teacher(tiny_teacher(arch).double(), CloneConfig(rank=12, **clone_config))
    randomize_trainable(clone)
    apply_activation_checkpointing(sharding_units(clone), mode)
    loss_cfg = {"alpha": 0.7, "logit_chunk_size": 7}
    if clone_config.get("attn_sharing") == "io":
        loss_cfg["shared_projection_terms"] = "reference"
    loss_fn = LRCLoss(LossConfig(**loss_cfg))
    loss_fn.check_sharing(clone_config.get("attn_sharing", "all"), clone_config.get("ffn_sharing", "all"))
    ids = random_ids(clone.teacher_config.vocab_size, batch=2, length=10)
    seg = torch.tensor([[0] * 4 + [1] * 6, [0] * 10]) if packed else None
    out = clone(ids, segment_ids=seg, terms=loss_fn.request, logits=loss_fn.wants_logits)
    parts = loss_fn(out, ids)
    parts["loss"].backward()
    grads = {n: p.grad.clone() for n, p in clone.named_trainable()}
    return {k: float(v.detach()) for k, v in parts.items() if torch.is_tensor(v) and v.numel() == 1}, grads


@pytest.mark.parametrize("arch,config", [("llama", {}), ("qwen2", {}), ("qwen3", {}),
                                         ("llama", {"attn_sharing": "io", "ffn_sharing": "io"})])
def test_full_and_student_checkpointing_give_the_values_and_gradients_of_keeping_everything(arch, config):
    want_parts, want_grads = loss_and_grads(arch, "off", **config)
    assert want_parts["clone"] > 0
    for mode in ("full", "student"):
        parts, grads = loss_and_grads(arch, mode, **config)
        assert parts.keys() == want_parts.keys()
        for k in want_parts:
            assert parts[k] == pytest.approx(want_parts[k], rel=1e-12, abs=1e-12), (mode, k)
        assert grads.keys() == want_grads.keys()
        for n in want_grads:
            torch.testing.assert_close(grads[n], want_grads[n], rtol=1e-10, atol=1e-12, msg=f"{mode} {n}")


def test_student_checkpointing_runs_each_teacher_layer_once(monkeypatch):
    """Counted calls of the layer function per stream over one forward and backward: "full" runs
    both streams twice, "student" the teacher once and the student twice, "off" each once."""
    real = layers_mod.decoder_layer
    calls = {"teacher": 0, "student": 0}

    def counting(x, w, *args, **kwargs):
        calls["teacher" if isinstance(w, nn.ParameterDict) else "student"] += 1
        return real(x, w, *args, **kwargs)

    monkeypatch.setattr(layers_mod, "decoder_layer", counting)
    n_layers = len(make_clone("llama").layers)
    for mode, want in (("off", (1, 1)), ("full", (2, 2)), ("student", (1, 2))):
        calls.update(teacher=0, student=0)
        loss_and_grads("llama", mode, packed=False)
        assert (calls["teacher"], calls["student"]) == (want[0] * n_layers, want[1] * n_layers), mode


def test_student_checkpointing_keeps_only_what_the_terms_read():
    assert teacher_activations_read(["q", "k", "v", "o", "gate", "up", "down"]) == (
        "q", "k", "v", "o", "gate", "up", "down")
    assert teacher_activations_read(["attn_in", "ffn_in", "down"]) == ("down", "attn_input", "ffn_input")
    assert teacher_activations_read([]) == ()
    with pytest.raises(ValueError, match="reads unknown activations"):
        register_clone_term("bad_reads", reads=["nope"])


def test_a_term_without_declared_reads_gets_every_teacher_activation():
    from lrc.losses import _TERM_REGISTRY

    register_clone_term("attn_undeclared")(lambda s, t, ctx: masked_mse(s["attn"], t["attn"], ctx.token_mask))
    try:
        assert teacher_activations_read(["q", "attn_undeclared"]) == ACTIVATION_KEYS
        clone = make_clone("llama", rank=12)
        apply_activation_checkpointing(sharding_units(clone), "student")
        loss_fn = LRCLoss(LossConfig(alpha=1.0, term_weights={"attn_undeclared": 1.0}))
        ids = random_ids(clone.teacher_config.vocab_size)
        out = clone(ids, terms=loss_fn.request)
        assert (0, "attn_undeclared") in out.clone_terms
        loss_fn(out, ids)["loss"].backward()
        assert all(p.grad is not None for _, p in clone.named_projections() if _.startswith("layers.0."))
    finally:
        del _TERM_REGISTRY["attn_undeclared"]


def test_checkpointing_setting_is_checked_before_any_work():
    assert [checkpointing_mode(v) for v in (False, None, "off", True, "full", "student")] == [
        "off", "off", "off", "full", "full", "student"]
    with pytest.raises(ValueError, match="activation_checkpointing must be"):
        checkpointing_mode("teacher")
    with pytest.raises(ValueError, match="activation_checkpointing must be"):
        FSDP2Strategy(activation_checkpointing="sometimes")
