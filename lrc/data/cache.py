"""The packed-token cache of in-memory sources: read, tokenize, split and pack one source once.

:func:`build_packed_source` caches a source's packed train and validation tokens as ``.npy``
arrays under ``<cache_dir>/packed/<name>-<fingerprint>/`` (fingerprint of the tokenizer, the
source definition and its files, ``seq_len``, the validation settings and the bos token that
starts every document when ``add_bos`` calls for one). Arrays are written atomically
(:func:`lrc.io.atomic_write`) and ``meta.json`` last, which marks the entry complete; later
runs memory-map them. Concurrent builds of one entry take turns under a file lock
(``<cache_dir>/.locks/``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from lrc.data.corpus import default_cache_dir
from lrc.data.packing import PackedStream, pack_documents, token_dtype, tokenize_documents
from lrc.data.sources import LOCAL_KINDS, SourceConfig, chatterbot_files, iter_documents, resolve_files
from lrc.io import atomic_write, file_lock

__all__ = ["PackedSource", "build_packed_source", "dedicated_val_split", "tokenized_docs", "tokenizer_fingerprint"]

PACK_VERSION = 1
_TOKENIZE_BATCH = 256


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of everything in a tokenizer that changes token ids or rendered chat text."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(f"|eos={tokenizer.eos_token_id}|n={len(tokenizer)}|".encode())
    h.update((getattr(tokenizer, "chat_template", None) or "").encode())
    return h.hexdigest()[:16]


def _files_signature(src: SourceConfig, cache_dir) -> Any:
    if src.kind in LOCAL_KINDS or src.kind == "chatterbot":
        sig = []
        for p in resolve_files(src) if src.kind in LOCAL_KINDS else chatterbot_files(src):
            st = p.stat()
            sig.append([os.path.realpath(p), st.st_size, st.st_mtime_ns])
        return sig
    if src.kind == "embedded":
        from lrc.data.corpus import build_embedded_corpus

        return build_embedded_corpus(cache_dir, roots=src.paths or None).fingerprint
    return None  # hub: identified by path/config/split/revision


def _source_fingerprint(
    src: SourceConfig, tok_fp: str, seq_len: int, val_spec: dict, cache_dir, bos_id: int | None = None
) -> str:
    d = src.to_dict()
    for k in ("weight", "streaming", "unique_tokens"):  # do not change the packed arrays
        d.pop(k, None)
    payload = {
        "pack_version": PACK_VERSION,
        "source": d,
        "files": _files_signature(src, cache_dir),
        "tokenizer": tok_fp,
        "seq_len": seq_len,
        "val": val_spec,
    }
    if bos_id is not None:  # only when set, so caches packed without a bos stay valid
        payload["bos"] = bos_id
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def dedicated_val_split(src: SourceConfig) -> str | None:
    """The split a source holds out for validation, or None (then validation is carved off its end)."""
    if src.kind == "embedded":
        return "validation"
    return src.val_split


@dataclass
class PackedSource:
    """Packed train and validation chunks of one in-memory source."""

    name: str
    train: PackedStream
    val: PackedStream
    meta: dict


def _atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_write(path) as fh:
        np.save(fh, arr)


def _atomic_write_json(path: Path, obj: dict) -> None:
    with atomic_write(path, "w") as fh:
        fh.write(json.dumps(obj, indent=2, sort_keys=True))


def tokenized_docs(
    texts: Iterator[str], tokenizer, stop_after_tokens: float = float("inf"), label: str = "source",
    bos_id: int | None = None,
) -> list[np.ndarray]:
    """Tokenize a text stream in batches (``bos_id`` first when given); stop once
    ``stop_after_tokens`` (+eos) were collected."""
    from lrc.progress import progress

    docs: list[np.ndarray] = []
    total = 0
    batch: list[str] = []
    dtype = token_dtype(len(tokenizer))

    def flush() -> bool:
        nonlocal total
        before = total
        for ids in tokenize_documents(batch, tokenizer, _TOKENIZE_BATCH, bos_id):
            docs.append(np.asarray(ids, dtype=dtype))
            total += len(ids) + 1
            if total >= stop_after_tokens:
                break
        batch.clear()
        advance(total - before)
        return total >= stop_after_tokens

    with progress(f"tokenizing {label}", unit="tokens") as advance:
        for text in texts:
            batch.append(text)
            if len(batch) >= _TOKENIZE_BATCH and flush():
                return docs
        if batch:
            flush()
    return docs


def build_packed_source(
    src: SourceConfig,
    tokenizer,
    seq_len: int,
    *,
    cache_dir: str | os.PathLike | None = None,
    val_fraction: float = 0.05,
    val_tokens: int | None = None,
    bos_id: int | None = None,
) -> PackedSource:
    """Read, tokenize, split and pack one source, or load it from the cache.

    Documents start with ``bos_id`` when given (see :func:`~lrc.data.packing.bos_to_add`;
    part of the cache key). Train documents come from ``src.split`` (at most ``max_tokens``
    worth when budgeted).
    Validation documents come from the dedicated split when the source has one (capped at
    ``val_tokens``), otherwise they are the source's last documents holding
    ``val_tokens`` (or ``val_fraction`` of all) tokens; at least one document is held out
    when the source has two or more and the target is positive.
    """
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    tok_fp = tokenizer_fingerprint(tokenizer)
    val_spec = {"fraction": val_fraction, "tokens": val_tokens}
    fp = _source_fingerprint(src, tok_fp, seq_len, val_spec, cache_root, bos_id)
    directory = cache_root / "packed" / f"{src.name}-{fp}"
    # one builder per entry: a concurrent job sharing the cache waits, then reads what it wrote
    with file_lock(cache_root / ".locks" / f"packed-{directory.name}.lock"):
        meta_path = directory / "meta.json"
        names = ("train_tokens", "train_doc_starts", "val_tokens", "val_doc_starts")
        if meta_path.is_file() and all((directory / f"{n}.npy").is_file() for n in names):
            arrays = {n: np.load(directory / f"{n}.npy", mmap_mode="r") for n in names}
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            return PackedSource(
                src.name,
                PackedStream(arrays["train_tokens"], np.asarray(arrays["train_doc_starts"]), seq_len),
                PackedStream(arrays["val_tokens"], np.asarray(arrays["val_doc_starts"]), seq_len),
                meta,
            )

        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer has no eos_token_id; packing needs one to separate documents")
        dtype = token_dtype(len(tokenizer))
        dedicated = dedicated_val_split(src)
        budget = float(src.max_tokens) + seq_len if src.max_tokens is not None else float("inf")
        if dedicated is None and budget != float("inf"):
            # read enough that the carved validation share leaves the full budget for training
            budget = budget + (val_tokens if val_tokens is not None else budget * val_fraction / max(1e-9, 1 - val_fraction))
        docs = tokenized_docs(
            iter_documents(src, tokenizer, src.split, cache_dir=cache_root), tokenizer, budget, label=src.name,
            bos_id=bos_id,
        )
        if dedicated is not None:
            val_cap = float(val_tokens) if val_tokens is not None else float("inf")
            val_docs = tokenized_docs(
                iter_documents(src, tokenizer, dedicated, cache_dir=cache_root), tokenizer, val_cap,
                label=f"{src.name} ({dedicated})", bos_id=bos_id,
            )
            train_docs = docs
        else:
            lengths = np.array([len(d) + 1 for d in docs], dtype=np.int64)
            target = val_tokens if val_tokens is not None else val_fraction * float(lengths.sum())
            n_val = 0
            if target > 0 and len(docs) >= 2:
                tail = np.cumsum(lengths[::-1])
                n_val = int(np.searchsorted(tail, target, side="left")) + 1
                n_val = min(max(n_val, 1), len(docs) - 1)
            train_docs, val_docs = docs[: len(docs) - n_val], docs[len(docs) - n_val :]
        train = pack_documents(train_docs, eos, seq_len, dtype)
        val = pack_documents(val_docs, eos, seq_len, dtype)
        meta = {
            "name": src.name,
            "fingerprint": fp,
            "seq_len": seq_len,
            "train_documents": len(train_docs),
            "val_documents": len(val_docs),
            "train_tokens_read": int(sum(len(d) + 1 for d in train_docs)),
            "val_tokens_read": int(sum(len(d) + 1 for d in val_docs)),
            "train_chunks": train.n_chunks,
            "val_chunks": val.n_chunks,
            "validation": "split:" + dedicated if dedicated else "carved",
            "bos": bos_id,
        }
        directory.mkdir(parents=True, exist_ok=True)
        _atomic_save_npy(directory / "train_tokens.npy", train.tokens)
        _atomic_save_npy(directory / "train_doc_starts.npy", train.doc_starts)
        _atomic_save_npy(directory / "val_tokens.npy", val.tokens)
        _atomic_save_npy(directory / "val_doc_starts.npy", val.doc_starts)
        _atomic_write_json(meta_path, meta)  # written last: marks the entry complete
        return PackedSource(src.name, train, val, meta)
