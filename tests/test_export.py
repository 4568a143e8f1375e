"""Export parity: the saved plain transformers model is the clone's student."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

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


# ------------------------------------------------------------------ which ranks can be exported
def _shape(arch: str, heads: int = 4, hidden: int = 64):
    """A tiny teacher config: ``heads`` attention heads of 16 dims, 2 KV heads."""
    from lrc.teachers import tiny_config

    return tiny_config(arch, hidden_size=hidden, num_heads=heads, num_kv_heads=2, head_dim=16)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_exportable_ranks_are_what_transformers_accepts(arch):
    """transformers 5.24 refuses a Llama config whose hidden size is not a multiple of the head
    count (explicit head_dim or not); Qwen2 and Qwen3 configs take any hidden size."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    from lrc.model.export import check_exportable_rank

    teacher = _shape(arch, heads=6, hidden=48)
    for rank in range(1, 49):
        try:
            AutoConfig.for_model(arch, hidden_size=rank, num_attention_heads=6, num_key_value_heads=2, head_dim=16)
            accepted = True
        except (StrictDataclassError, ValueError):
            accepted = False
        assert accepted == (arch != "llama" or rank % 6 == 0), rank
        if accepted:
            check_exportable_rank(teacher, rank)
        else:
            below, above = rank // 6 * 6, rank // 6 * 6 + 6
            nearest = f"{below}, {above}" if below else f"{above}"
            with pytest.raises(ValueError, match=rf"rank={rank} cannot be exported.*not a multiple of the number "
                                                  rf"of attention heads \(6\).*nearest exportable ranks: {nearest}$"):
                check_exportable_rank(teacher, rank)


def test_smollm2_shaped_teacher_names_the_nearest_ranks():
    """The default teacher has 9 heads: rank 32 of `-m student.rank=32,64` is refused before any work."""
    from lrc.teachers import tiny_config

    smol = tiny_config("llama", hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64, num_layers=2)
    for rank, nearest in [(32, "27, 36"), (64, "63, 72"), (1, "9"), (575, "567, 576")]:
        with pytest.raises(ValueError, match=rf"rank={rank} cannot be exported.*nearest exportable ranks: {nearest}$"):
            CloneConfig(rank=rank).validate_for(smol)
    for rank in (9, 144, 288, 576):
        CloneConfig(rank=rank).validate_for(smol)


def test_unexportable_rank_is_refused_before_the_clone_is_built():
    teacher = tiny_teacher("llama")
    before = {n: p.requires_grad for n, p in teacher.named_parameters()}
    with pytest.raises(ValueError, match=r"rank=13 cannot be exported.*nearest exportable ranks: 12, 16"):
        LowRankClone.from_teacher(teacher, CloneConfig(rank=13))
    assert {n: p.requires_grad for n, p in teacher.named_parameters()} == before  # teacher untouched


@pytest.mark.parametrize("arch,rank", [("llama", 18), ("llama", 6), ("qwen2", 20), ("qwen2", 7),
                                       ("qwen3", 20), ("qwen3", 1)])
def test_every_accepted_rank_exports_with_parity(tmp_path, arch, rank):
    """6 heads: multiples of 6 for Llama, any rank (multiple of the head count or not) for Qwen."""
    teacher = tiny_teacher(arch, hidden_size=48, num_heads=6, num_kv_heads=2, head_dim=16)
    clone = LowRankClone.from_teacher(teacher, CloneConfig(rank=rank), tokenizer=tiny_tokenizer())
    randomize_trainable(clone)
    student = AutoModelForCausalLM.from_pretrained(clone.save_student(tmp_path / "s")).eval()
    assert student.config.hidden_size == rank and student.config.head_dim == 16
    ids = random_ids(teacher.config.vocab_size, length=30)
    with torch.no_grad():
        assert (student(ids).logits - clone(ids).student_logits).abs().max() <= 1e-4


# ------------------------------------------------------------------ bf16 parity, files on disk
def test_bf16_export_parity_at_long_positions(tmp_path):
    """A bf16 teacher (Llama-3 rope scaling) trains with fp32 RoPE frequencies, like the exported
    student that transformers reloads in bf16: same logits up to position 1023."""
    from lrc.teachers import load_teacher

    tiny = {"max_position_embeddings": 4096, "num_layers": 1}
    teacher, tok = load_teacher("tiny-llama", dtype="bfloat16", tiny=tiny)
    clone = LowRankClone.from_teacher(teacher, CloneConfig(rank=16), tokenizer=tok)
    randomize_trainable(clone)
    out = clone.save_student(tmp_path / "s", dtype=torch.bfloat16)
    student = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    assert student.model.rotary_emb.inv_freq.dtype == torch.float32
    ids = random_ids(teacher.config.vocab_size, batch=1, length=1024)
    with torch.no_grad():
        got, expected = student(ids).logits.float(), clone(ids).student_logits.float()
    assert (got - expected).abs().max() <= 2e-3  # with bf16-rounded inv_freq: 8e-3


def test_bf16_cast_teacher_still_gets_fp32_rope():
    """`teacher.to(torch.bfloat16)` casts the rotary buffers too; the clone rebuilds them in fp32."""
    reference = tiny_teacher("llama").model.rotary_emb
    clone = LowRankClone.from_teacher(tiny_teacher("llama").to(torch.bfloat16), CloneConfig(rank=16))
    assert clone.rotary.inv_freq.dtype == torch.float32
    assert torch.equal(clone.rotary.inv_freq, reference.inv_freq)
    x, pos = torch.zeros(1, dtype=torch.bfloat16), torch.arange(2048)[None]
    assert all(torch.equal(a, b) for a, b in zip(clone.rotary(x, pos), reference(x, pos)))


def test_export_respects_the_umask(tmp_path):
    clone = make_clone("qwen2", rank=8)
    clone.tokenizer = tiny_tokenizer()
    old = os.umask(0o027)
    try:
        out = clone.save_student(tmp_path / "s")
        again = clone.save_student(tmp_path / "s", overwrite=True)
    finally:
        os.umask(old)
    assert again == out
    assert stat.S_IMODE(out.stat().st_mode) == 0o750  # 0o777 & ~0o027, as a plain mkdir gives
    files = sorted(p.name for p in out.iterdir())
    assert {"model.safetensors", "config.json", "tokenizer.json", "lrc_clone.json"} <= set(files)
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in out.iterdir()} == dict.fromkeys(files, oct(0o640))
    assert [p.name for p in tmp_path.iterdir()] == ["s"]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name file descriptors")
def test_export_is_flushed_to_disk_before_the_rename(tmp_path, monkeypatch):
    """A crash right after the rename must not find half-written files in the export."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, **kw):
        events.append(("replace", str(dst)))
        return real_replace(src, dst, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = make_clone("llama", rank=8).save_student(tmp_path / "s")
    rename = events.index(("replace", str(out)))
    flushed = {Path(p).name for kind, p in events[:rename] if kind == "fsync"}
    assert {p.name for p in out.iterdir()} <= flushed
    assert ("fsync", os.path.realpath(tmp_path)) in events[rename:]  # the rename itself is flushed too
