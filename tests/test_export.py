"""Export parity: the saved plain transformers model is the clone's student."""

from __future__ import annotations

import json

import pytest
import torch
from clone_utils import make_clone, random_ids, randomize_trainable
from transformers import AutoModelForCausalLM, AutoTokenizer

from lrc.model import CloneConfig, LowRankClone
from lrc.teachers import tiny_teacher, tiny_tokenizer

CASES = [
    # arch, sharing, teacher tied, tie_head_projection, layers
    ("llama", "all", True, None, None),
    ("llama", "io", True, False, None),
    ("llama", "all", False, None, [0, 3]),
    ("llama", "all", False, True, None),  # untied teacher + shared projection: student still untied
    ("qwen2", "all", True, None, None),
    ("qwen2", "io", False, None, [1, 2]),
    ("qwen3", "all", False, None, None),
    ("qwen3", "io", True, None, [2]),
]


@pytest.mark.parametrize("arch,sharing,tied,tie_proj,layers", CASES)
def test_export_parity(tmp_path, arch, sharing, tied, tie_proj, layers):
    teacher = tiny_teacher(arch, tie_word_embeddings=tied)
    clone = LowRankClone.from_teacher(
        teacher,
        CloneConfig(rank=24, attn_sharing=sharing, ffn_sharing=sharing, tie_head_projection=tie_proj, layers=layers),
        tokenizer=tiny_tokenizer(),
    )
    randomize_trainable(clone)
    out = clone.save_student(tmp_path / "student")
    student = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = random_ids(teacher.config.vocab_size, length=40)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = clone(ids).student_logits
        got = student(ids).logits
    assert (got - expected).abs().max() <= 1e-4
    cfg = student.config
    assert type(student).__name__ == type(teacher).__name__
    assert cfg.hidden_size == 24
    assert cfg.head_dim == teacher.config.head_dim
    assert cfg.num_hidden_layers == (4 if layers is None else len(layers))
    assert cfg.intermediate_size == teacher.config.intermediate_size
    assert cfg.num_attention_heads == teacher.config.num_attention_heads
    student_tied = tied and tie_proj is not False
    assert cfg.tie_word_embeddings == student_tied
    same = student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    assert same == student_tied
    assert cfg.rms_norm_eps == teacher.config.rms_norm_eps
    assert cfg.rope_parameters == teacher.config.rope_parameters
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == tiny_tokenizer().chat_template
    meta = json.loads((out / "lrc_clone.json").read_text())
    assert meta["student_layers"] == clone.student_layers and meta["clone_config"]["rank"] == 24
    # generation works on the plain model
    gen = student.generate(ids[:1, :5], attention_mask=mask[:1, :5], max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 8)


def test_export_uses_training_eps_and_refuses_non_empty_dir(tmp_path):
    clone = make_clone("llama", rank=8, rms_norm_eps=1e-3)
    student = clone.to_hf()
    assert student.config.rms_norm_eps == 1e-3
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("a previous run")
    with pytest.raises(FileExistsError, match="not empty"):
        clone.save_student(tmp_path / "x")
    assert (tmp_path / "x" / "keep.txt").exists()
    clone.save_student(tmp_path / "x", overwrite=True)
    assert not (tmp_path / "x" / "keep.txt").exists() and (tmp_path / "x" / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["x"]  # no temporary directory left behind


def test_to_hf_is_independent_of_the_clone():
    clone = make_clone("qwen2", rank=8)
    randomize_trainable(clone)
    student = clone.to_hf()
    ids = random_ids(clone.arch.vocab_size)
    before = student(ids).logits.detach().clone()
    with torch.no_grad():
        for _, p in clone.named_projections():
            p.mul_(2)
    assert torch.equal(student(ids).logits, before)
