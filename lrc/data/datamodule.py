"""``TokenMixDataModule``: a packed, mixed, exactly resumable token stream for distillation.

Pipeline (see :mod:`lrc.data.sources` and :mod:`lrc.data.packing`):

1. every source is validated when the module is built (fail fast, before any work), and
   :meth:`~TokenMixDataModule.check_data` reads the data before training (a bad row names
   its file, line and field; too little data for one batch or one validation sequence
   says what to change);
2. **in-memory** sources (``streaming: false``) are read, tokenized, split into train
   and validation documents, packed into ``seq_len`` chunks and cached as ``.npy``
   arrays under ``<cache_dir>/packed/<fingerprint>/`` (fingerprint of tokenizer, source
   definition and files, ``seq_len``, validation settings and the bos token that starts
   every document when ``add_bos`` calls for one; atomic writes) by
   :meth:`prepare_data`; :meth:`setup` memory-maps them;
3. if any source is **streaming**, all training sources are read, tokenized and packed on
   the fly in an ``IterableDataset`` (validation is still packed in memory);
4. chunks of the sources are mixed by :func:`~lrc.data.packing.mixture_counts` (weights,
   token budgets, ``max_train_tokens``) and :func:`~lrc.data.packing.interleave` (every
   prefix of an epoch holds each source's share to within one sequence); each epoch
   shuffles the chunks of every source with a permutation seeded by ``(seed, epoch,
   source)`` (streaming: a per-source shuffle buffer), before mixing. A weighted source
   holding fewer sequences than its share stops the epoch, is read again, or leaves the
   others more room (``on_exhausted``), and is reported in the log.

Validation: a source's dedicated split when it has one (the embedded corpus' held-out
packages, a hub ``val_split``); otherwise, for in-memory mixtures, its last documents
(``val_fraction`` of its tokens, or ``val_tokens``), and for streaming mixtures the
first documents of the stream (``val_tokens``, default 16 sequences), which training
skips. Validation documents never appear in training.

Batches are dicts::

    {"input_ids":  LongTensor[B, T],   # T = seq_len, documents separated by eos
     "source_ids": LongTensor[B],      # index into datamodule.source_names
     "segment_ids": LongTensor[B, T]}  # only with document_mask=True (see lrc.data.packing)

Exact mid-epoch resume: :meth:`state_dict` returns
``{"version": 1, "epoch": e, "batches_consumed": n, "fingerprint": ..., "seed": ...}``
(Lightning stores it in checkpoints; the training dataloader also implements the
``state_dict``/``load_state_dict`` protocol so Lightning's loop restores it too).
After :meth:`load_state_dict`, the first iteration of epoch ``e`` skips exactly ``n``
batches, so a resumed run sees the same remaining batches as an uninterrupted one.
Multi-device: each rank takes every ``world_size``-th batch itself (rank and world size
come from the attached trainer); the sampler is a ``DistributedSampler`` subclass, so
Lightning does not wrap it again.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, Subset, get_worker_info

from lrc.data.corpus import default_cache_dir
from lrc.data.packing import (
    BOS_MODES,
    EXHAUSTED_MODES,
    Lookahead,
    OnlineInterleaver,
    PackedStream,
    StreamPacker,
    bos_to_add,
    interleave,
    mixture_counts,
    pack_documents,
    planned_weighted_chunks,
    renormalised_order,
    seeded_rng,
    token_dtype,
    tokenize_documents,
)
from lrc.data.sources import LOCAL_KINDS, SourceConfig, iter_documents, validate_source

__all__ = [
    "MixtureSampler",
    "PackedChunks",
    "ResumableDataLoader",
    "StreamingMixture",
    "TokenMixDataModule",
    "build_packed_source",
    "tokenizer_fingerprint",
]

PACK_VERSION = 1
STATE_VERSION = 1
_TOKENIZE_BATCH = 256
log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- fingerprints


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
    if src.kind in LOCAL_KINDS:
        from lrc.data.sources import resolve_files

        sig = []
        for p in resolve_files(src):
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


def _dedicated_val_split(src: SourceConfig) -> str | None:
    if src.kind == "embedded":
        return "validation"
    return src.val_split


# --------------------------------------------------------------------------- packing sources


@dataclass
class PackedSource:
    """Packed train and validation chunks of one in-memory source."""

    name: str
    train: PackedStream
    val: PackedStream
    meta: dict


def _atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
    with open(tmp, "wb") as fh:
        np.save(fh, arr)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _atomic_write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def _tokenized_docs(
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
    dedicated = _dedicated_val_split(src)
    budget = float(src.max_tokens) + seq_len if src.max_tokens is not None else float("inf")
    if dedicated is None and budget != float("inf"):
        # read enough that the carved validation share leaves the full budget for training
        budget = budget + (val_tokens if val_tokens is not None else budget * val_fraction / max(1e-9, 1 - val_fraction))
    docs = _tokenized_docs(
        iter_documents(src, tokenizer, src.split, cache_dir=cache_root), tokenizer, budget, label=src.name,
        bos_id=bos_id,
    )
    if dedicated is not None:
        val_cap = float(val_tokens) if val_tokens is not None else float("inf")
        val_docs = _tokenized_docs(
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


# --------------------------------------------------------------------------- datasets


class PackedChunks(Dataset):
    """Map-style dataset over the chunks of several packed sources (global index = offset + chunk)."""

    def __init__(self, streams: Sequence[PackedStream], document_mask: bool = False) -> None:
        self.streams = list(streams)
        self.document_mask = document_mask
        self.sizes = [s.n_chunks for s in self.streams]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """``(source, chunk)`` of a global index."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        src = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return src, int(index - self.offsets[src])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        src, chunk = self.locate(int(index))
        stream = self.streams[src]
        item = {
            "input_ids": torch.from_numpy(np.asarray(stream.chunk(chunk), dtype=np.int64)),
            "source_ids": torch.tensor(src, dtype=torch.long),
        }
        if self.document_mask:
            item["segment_ids"] = torch.from_numpy(stream.chunk_segments(chunk))
        return item


class ResumablePosition:
    """Epoch and resume position shared by the in-memory sampler and the streaming mixture:
    iteration of epoch ``resume_epoch`` starts at batch ``resume_batch``."""

    def _init_position(self) -> None:
        self.epoch = 0
        self.resume_epoch: int | None = None
        self.resume_batch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_resume(self, epoch: int, batch: int) -> None:
        self.resume_epoch, self.resume_batch = int(epoch), int(batch)

    def start_batch(self) -> int:
        return self.resume_batch if self.resume_epoch == self.epoch else 0


class MixtureSampler(ResumablePosition, DistributedSampler):
    """Deterministic, epoch-aware, resumable order over a :class:`PackedChunks` mixture.

    It shards by rank itself; it subclasses ``DistributedSampler`` only so that Lightning
    leaves it in place instead of wrapping it in another distributed sampler.

    Epoch ``e`` takes ``counts[i]`` chunks of source ``i`` (the first ``counts[i]`` of a
    permutation seeded by ``(seed, e, i)`` when ``shuffle``, else the first ones in order;
    a count above the source's size goes on with further passes, seeded by ``(seed, e, i,
    pass)``), in the order of ``labels`` (default :func:`~lrc.data.packing.interleave` of
    the counts). The epoch is cut into batches of
    ``batch_size``; rank ``r`` of ``world_size`` takes global batches ``r, r + W, ...``
    (all ranks get the same number). Iteration yields sample indices of whole batches,
    starting at batch ``resume_batch`` when the epoch is ``resume_epoch``.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        counts: Sequence[int],
        *,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
        labels: np.ndarray | None = None,
    ) -> None:
        self.sizes = [int(s) for s in sizes]
        self.counts = [int(c) for c in counts]
        if any(c > 0 and s == 0 for c, s in zip(self.counts, self.sizes)):
            raise ValueError("a source without chunks cannot contribute any")
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.batch_size = int(batch_size)
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.num_replicas = world_size  # DistributedSampler attribute names
        self.labels = interleave(self.counts, seed) if labels is None else np.asarray(labels, dtype=np.int64)
        if np.bincount(self.labels, minlength=len(self.counts)).tolist() != self.counts:
            raise ValueError("labels must hold counts[i] positions of every source i")
        self._init_position()
        self._cache: tuple[int, np.ndarray] | None = None

    def set_rank(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size, self.num_replicas = int(rank), int(world_size), int(world_size)

    # -- epoch order

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Global chunk indices of one epoch, all ranks, in order."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        order = np.empty(len(self.labels), dtype=np.int64)
        for i, (size, count) in enumerate(zip(self.sizes, self.counts)):
            if count == 0:
                continue
            passes = []
            for p in range(-(-count // size)):  # more than one pass: the source is read again
                key = ("chunks", self.seed, epoch, i) + ((p,) if p else ())
                passes.append(seeded_rng(*key).permutation(size) if self.shuffle else np.arange(size))
            order[self.labels == i] = self.offsets[i] + np.concatenate(passes)[:count]
        self._cache = (epoch, order)
        return order

    def batches_per_epoch(self) -> int:
        n = len(self.labels)
        total = n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        return total // self.world_size

    def rank_batches(self, epoch: int) -> list[np.ndarray]:
        order = self.epoch_order(epoch)
        B = self.batch_size
        return [
            order[(b * self.world_size + self.rank) * B : (b * self.world_size + self.rank + 1) * B]
            for b in range(self.batches_per_epoch())
        ]

    def __iter__(self) -> Iterator[int]:
        for batch in self.rank_batches(self.epoch)[self.start_batch() :]:
            yield from batch.tolist()

    def __len__(self) -> int:
        """Samples of a full epoch on this rank, also when resuming (Lightning counts resumed batches itself)."""
        n, B = len(self.labels), self.batch_size
        bpe = self.batches_per_epoch()
        if bpe == 0:
            return 0
        last_global = (bpe - 1) * self.world_size + self.rank
        return (bpe - 1) * B + min(B, n - last_global * B)


class StreamingMixture(ResumablePosition, IterableDataset):
    """Pack-on-the-fly mixture of document streams, yielding whole batches.

    Sources are read with :func:`~lrc.data.sources.iter_documents` (skipping the first
    ``skip_docs[i]`` documents, which were held out for validation), tokenized (``bos_id``
    first when given), packed with :class:`~lrc.data.packing.StreamPacker` and mixed with
    :class:`~lrc.data.packing.OnlineInterleaver` over ``shares``. A budgeted source stops at
    its chunk budget (or leaves the mixture when it runs dry first); ``total_chunks`` caps
    the epoch. A weighted source (no budget) that runs dry does what ``on_exhausted`` says
    (:data:`~lrc.data.packing.EXHAUSTED_MODES`): ``stop`` ends the epoch; ``restart`` reads
    it again from its start while another weighted source still has unread chunks (else
    the epoch ends); ``renormalise`` drops it and the others go on with their shares
    renormalised until every source has run dry. A source that runs dry while others still
    have chunks is reported once per epoch in the log (source, position, tokens read against
    its ``planned`` share). With ``shuffle``, each source's chunks pass a shuffle buffer of
    ``shuffle_buffer`` chunks seeded by ``(seed, epoch, source)`` (``+ (pass,)`` when read
    again) before mixing. Batch ``b`` of the epoch goes to dataloader worker ``b % W``, so
    the batch order does not depend on the number of workers (each worker reads the full
    stream). Resuming replays the stream and skips ``resume_batch`` batches.
    """

    def __init__(
        self,
        sources: Sequence[SourceConfig],
        tokenizer,
        *,
        seq_len: int,
        batch_size: int,
        shares: Sequence[float],
        budgets: Sequence[int | None],
        on_exhausted: str = "stop",
        planned: Sequence[float | None] | None = None,
        total_chunks: int | None = None,
        skip_docs: Sequence[int] | None = None,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 1024,
        drop_last: bool = True,
        document_mask: bool = False,
        cache_dir: str | os.PathLike | None = None,
        rank: int = 0,
        world_size: int = 1,
        bos_id: int | None = None,
    ) -> None:
        if on_exhausted not in EXHAUSTED_MODES:
            raise ValueError(f"on_exhausted must be one of {EXHAUSTED_MODES}, got {on_exhausted!r}")
        self.sources = list(sources)
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.shares = list(shares)
        self.budgets = list(budgets)
        self.on_exhausted = on_exhausted
        self.planned = list(planned) if planned is not None else [None] * len(self.sources)
        self.total_chunks = total_chunks
        self.skip_docs = list(skip_docs or [0] * len(self.sources))
        self.seed = seed
        self.shuffle = shuffle
        self.shuffle_buffer = max(1, int(shuffle_buffer))
        self.drop_last = drop_last
        self.document_mask = document_mask
        self.cache_dir = cache_dir
        self.rank = rank
        self.world_size = world_size
        self.bos_id = bos_id
        self._init_position()

    def _source_chunks(self, i: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        src = self.sources[i]
        eos = self.tokenizer.eos_token_id
        packer = StreamPacker(eos, self.seq_len)
        docs = iter_documents(src, self.tokenizer, src.split, cache_dir=self.cache_dir)
        for _ in range(self.skip_docs[i]):
            if next(docs, None) is None:
                return
        batch: list[str] = []
        for text in docs:
            batch.append(text)
            if len(batch) >= 64:
                for ids in tokenize_documents(batch, self.tokenizer, bos_id=self.bos_id):
                    yield from packer.feed(ids)
                batch = []
        for ids in tokenize_documents(batch, self.tokenizer, bos_id=self.bos_id):
            yield from packer.feed(ids)

    def _stream(self, i: int, read: int, buffered: bool) -> Lookahead:
        """Source ``i`` read for the ``read``-th time this epoch (0 = first)."""
        chunks = self._source_chunks(i)
        return Lookahead(self._shuffled(chunks, i, read) if buffered else chunks)

    def iter_chunks(self, *, buffered: bool = True, report: bool = False) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """``(source, tokens, segment_ids)`` of the epoch's mixture (each source buffer-shuffled
        unless ``buffered`` is False); ``report`` logs sources that run dry early."""
        k = len(self.sources)
        weighted = [b is None for b in self.budgets]
        reads = [0] * k  # times each source was started again this epoch
        in_read = [0] * k  # chunks taken from the current read
        streams = [self._stream(i, 0, buffered) for i in range(k)]
        mixer = OnlineInterleaver(self.shares, seed=self.seed)
        taken = [0] * k
        produced = 0
        while self.total_chunks is None or produced < self.total_chunks:
            i = mixer.next()
            if i is None:
                return
            chunk = streams[i].pop()
            if chunk is None:  # source i ran dry
                mixer.taken[i] -= 1  # nothing was taken at this position
                mixer.t -= 1
                if not weighted[i]:  # a budgeted source short of its budget leaves the mixture
                    mixer.exclude(i)
                    continue
                # another weighted source has chunks it has not given yet
                unread = any(j != i and weighted[j] and reads[j] == 0 and not streams[j].done for j in mixer.live)
                if self.on_exhausted == "restart" and unread and in_read[i]:
                    if report and reads[i] == 0:
                        self._report_dry(i, taken[i], produced, "it is read again from its start")
                    reads[i] += 1
                    in_read[i] = 0
                    streams[i] = self._stream(i, reads[i], buffered)
                elif self.on_exhausted == "renormalise" or (self.on_exhausted == "restart" and unread):
                    if report and unread:  # (restart: a source without any chunk)
                        self._report_dry(i, taken[i], produced, "the other sources go on with their weights renormalised")
                    mixer.drop(i)
                else:  # stop, or restart once every weighted source has been read to its end
                    if report and unread:
                        self._report_dry(i, taken[i], produced, "the epoch ends here")
                    return
                continue
            in_read[i] += 1
            taken[i] += 1
            produced += 1
            yield i, chunk[0], chunk[1]
            if self.budgets[i] is not None and taken[i] >= self.budgets[i]:
                mixer.exclude(i)

    def _report_dry(self, i: int, taken: int, position: int, action: str) -> None:
        planned = self.planned[i]
        plan = (f"its planned share is {planned * self.seq_len:,.0f} tokens" if planned is not None
                else "no planned share (max_train_tokens is not set)")
        log.warning(
            "data source %r ran dry in epoch %d after %s tokens (%d sequences of %d), at sequence %d "
            "(batch %d) of the mixture; %s; %s (on_exhausted=%s)",
            self.sources[i].name, self.epoch, f"{taken * self.seq_len:,}", taken, self.seq_len, position,
            position // self.batch_size, plan, action, self.on_exhausted,
        )

    def _shuffled(self, items: Iterator, source: int, read: int = 0) -> Iterator:
        """Buffer shuffle of one source's chunks (before mixing, so the mixture stays smooth)."""
        if not self.shuffle:
            yield from items
            return
        rng = seeded_rng("stream-shuffle", self.seed, self.epoch, source, *((read,) if read else ()))
        buf: list = []
        for item in items:
            if len(buf) < self.shuffle_buffer:
                buf.append(item)
                continue
            j = int(rng.integers(len(buf)))
            buf[j], item = item, buf[j]
            yield item
        order = rng.permutation(len(buf))
        for j in order:
            yield buf[int(j)]

    def first_chunks(self, n: int) -> int:
        """How many of the epoch's first ``n`` chunks exist (read without the shuffle buffer:
        a quick check that the stream can fill a batch)."""
        return sum(1 for _ in itertools.islice(self.iter_chunks(buffered=False), n))

    def _batches(self, report: bool = False) -> Iterator[list]:
        batch: list = []
        for item in self.iter_chunks(report=report):
            batch.append(item)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch and not self.drop_last:
            yield batch

    def _collate(self, items: list) -> dict[str, torch.Tensor]:
        out = {
            "input_ids": torch.from_numpy(np.stack([t for _, t, _ in items]).astype(np.int64)),
            "source_ids": torch.tensor([s for s, _, _ in items], dtype=torch.long),
        }
        if self.document_mask:
            out["segment_ids"] = torch.from_numpy(np.stack([g for _, _, g in items]).astype(np.int64))
        return out

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        start = self.start_batch()
        local = 0  # batches of this rank seen so far
        for b, batch in enumerate(self._batches(report=worker == 0 and self.rank == 0)):
            if b % self.world_size != self.rank:
                continue
            if local >= start and (local - start) % n_workers == worker:
                yield self._collate(batch)
            local += 1


# --------------------------------------------------------------------------- data loader


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` that knows its position (epoch, batches returned in that epoch).

    Counts the batches it hands out in the main process. Implements Lightning's
    ``state_dict``/``load_state_dict`` protocol by delegating to the owning data module.
    ``epoch_fn`` (optional) supplies the epoch before each iteration (Lightning only calls
    ``set_epoch`` on map-style samplers).
    """

    def __init__(
        self,
        *args: Any,
        position_target: Any = None,
        state_fn: Callable[[], dict] | None = None,
        load_fn: Callable[[dict], None] | None = None,
        epoch_fn: Callable[[], int | None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._target = position_target  # MixtureSampler or StreamingMixture
        self._state_fn = state_fn
        self._load_fn = load_fn
        self._epoch_fn = epoch_fn
        self.position = (0, 0)

    def set_epoch(self, epoch: int) -> None:
        self._target.set_epoch(epoch)

    def __iter__(self):
        if self._epoch_fn is not None:
            epoch = self._epoch_fn()
            if epoch is not None:
                self._target.set_epoch(epoch)
        epoch = self._target.epoch
        consumed = self._target.start_batch()
        self.position = (epoch, consumed)
        for batch in super().__iter__():
            consumed += 1
            self.position = (epoch, consumed)
            yield batch

    def state_dict(self) -> dict:
        return self._state_fn() if self._state_fn is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self._load_fn is not None and state:
            self._load_fn(state)


# --------------------------------------------------------------------------- data module


class TokenMixDataModule(LightningDataModule):
    """Packed, mixed token batches from several sources, with exact mid-epoch resume.

    Args:
        sources: list of :class:`~lrc.data.sources.SourceConfig` or dicts with its fields.
        tokenizer: a Hugging Face tokenizer, a name/path for ``AutoTokenizer``, or None
            (then call :meth:`set_tokenizer` before ``prepare_data``/``setup``).
        seq_len: tokens per sequence (chunk).
        batch_size: sequences per training batch (per device).
        num_workers: dataloader worker processes.
        seed: seeds the mixture tie-breaks, the per-epoch shuffles and the stream shuffle buffer.
        val_fraction: share of each source's tokens held out (last documents) when it has
            no dedicated validation split.
        val_tokens: instead of ``val_fraction``: tokens held out per source (also caps a
            dedicated validation split, and sets the held-out head of streaming sources;
            default ``16 * seq_len`` there).
        val_sequences: cap on the total number of validation sequences (the cap keeps the
            source proportions).
        val_batch_size: validation batch size (default ``batch_size``).
        max_train_tokens: cap on training tokens per epoch (proportions kept).
        max_seq_len: the teacher's maximum context; ``seq_len`` above it is an error.
        document_mask: also emit ``segment_ids`` for document-boundary attention masks.
        shuffle: shuffle chunks (deterministically, per epoch). Validation is never shuffled.
        drop_last: drop the last partial training batch (default True: fixed shapes).
        shuffle_buffer: chunk shuffle buffer of streaming mixtures.
        cache_dir: cache root (default ``$LRC_CACHE`` or ``~/.cache/lrc``).
        pin_memory: passed to the dataloaders.
        add_bos: put the tokenizer's bos token at every document start: ``"auto"`` (as the
            tokenizer does itself, see :func:`~lrc.data.packing.bos_to_add`), True or False.
        on_exhausted: what a weighted source holding fewer sequences than its share of the
            epoch does: ``"stop"`` (end the epoch), ``"restart"`` (read it again from its
            start) or ``"renormalise"`` (the others go on with renormalised weights); see
            :func:`~lrc.data.packing.mixture_counts` and :class:`StreamingMixture`. It is
            reported in the log.
    """

    def __init__(
        self,
        sources: Sequence[SourceConfig | Mapping[str, Any]],
        tokenizer: Any = None,
        seq_len: int = 512,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        val_fraction: float = 0.05,
        val_tokens: int | None = None,
        val_sequences: int | None = None,
        val_batch_size: int | None = None,
        max_train_tokens: int | None = None,
        max_seq_len: int | None = None,
        document_mask: bool = False,
        shuffle: bool = True,
        drop_last: bool = True,
        shuffle_buffer: int = 1024,
        cache_dir: str | None = None,
        pin_memory: bool = False,
        add_bos: str | bool = "auto",
        on_exhausted: str = "stop",
    ) -> None:
        super().__init__()
        if sources is None or len(sources) == 0:
            raise ValueError("TokenMixDataModule needs at least one data source")
        self.sources = [SourceConfig.from_any(s) for s in sources]
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"data source names must be unique; repeated: {dupes}")
        for src in self.sources:
            validate_source(src)
        if not isinstance(seq_len, int) or seq_len < 2:
            raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
        if max_seq_len is not None and seq_len > max_seq_len:
            raise ValueError(f"seq_len={seq_len} exceeds the teacher's maximum sequence length max_seq_len={max_seq_len}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        for key, val in (("val_tokens", val_tokens), ("val_sequences", val_sequences),
                         ("max_train_tokens", max_train_tokens)):
            if val is not None and (not isinstance(val, int) or val < 0):
                raise ValueError(f"{key} must be a non-negative integer or null, got {val!r}")
        if max_train_tokens is not None and max_train_tokens < seq_len:
            raise ValueError(f"max_train_tokens={max_train_tokens} is less than one sequence of seq_len={seq_len}")
        if add_bos not in BOS_MODES or not isinstance(add_bos, (str, bool)):
            raise ValueError(f"add_bos must be one of auto, true, false; got {add_bos!r}")
        if on_exhausted not in EXHAUSTED_MODES:
            raise ValueError(f"on_exhausted must be one of {', '.join(EXHAUSTED_MODES)}; got {on_exhausted!r}")
        self.add_bos = add_bos
        self.on_exhausted = on_exhausted
        self.bos_id: int | None = None
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.val_fraction = val_fraction
        self.val_tokens = val_tokens
        self.val_sequences = val_sequences
        self.val_batch_size = val_batch_size or batch_size
        self.max_train_tokens = max_train_tokens
        self.max_seq_len = max_seq_len
        self.document_mask = document_mask
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.shuffle_buffer = shuffle_buffer
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.pin_memory = pin_memory
        self.streaming = any(s.streaming for s in self.sources)
        if self.streaming:
            self._check_streaming_mixture()
        self._packed: list[PackedSource] | None = None
        self._val_read: list[tuple] = []  # per source: held-out documents, tokens, where from, all documents
        self.train_dataset: Dataset | None = None
        self.val_dataset: PackedChunks | None = None
        self.val_indices: list[int] = []
        self.sampler: MixtureSampler | None = None
        self._train_loader: ResumableDataLoader | None = None
        self._resume: dict | None = None
        self.counts: list[int | None] = []
        self.available_chunks: list[int | None] = []
        self.tokenizer = None
        if tokenizer is not None:
            self.set_tokenizer(tokenizer)

    # ------------------------------------------------------------------ configuration

    @property
    def source_names(self) -> list[str]:
        """Source names; ``batch["source_ids"]`` indexes this list."""
        return [s.name for s in self.sources]

    def set_tokenizer(self, tokenizer: Any) -> None:
        """Set the (teacher's) tokenizer; a string is loaded with ``AutoTokenizer``."""
        if isinstance(tokenizer, (str, os.PathLike)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer))
        if getattr(tokenizer, "eos_token_id", None) is None:
            raise ValueError("the tokenizer has no eos_token_id; packing needs one to separate documents")
        for src in self.sources:
            validate_source(src, tokenizer, check_data=False)
        bos_id = bos_to_add(tokenizer, self.add_bos)
        fp = tokenizer_fingerprint(tokenizer)
        if (getattr(self, "_tokenizer_fp", fp), self.bos_id) != (fp, bos_id):  # rebuild on next setup
            self.train_dataset = self.val_dataset = self.sampler = self._train_loader = None
        self.tokenizer = tokenizer
        self._tokenizer_fp = fp
        self.bos_id = bos_id

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("TokenMixDataModule has no tokenizer: pass tokenizer=... or call set_tokenizer()")
        return self.tokenizer

    def _check_streaming_mixture(self) -> None:
        has_w = [s.weight is not None for s in self.sources]
        has_b = [s.max_tokens is not None for s in self.sources]
        if len(self.sources) > 1 and not (all(has_w) or all(has_b)):
            raise ValueError(
                "a streaming mixture needs 'weight' on every source or 'max_tokens' on every source "
                f"(sizes of streams are unknown); got weights={[s.weight for s in self.sources]}, "
                f"max_tokens={[s.max_tokens for s in self.sources]}"
            )

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        return 0, 1

    def _mixture_fingerprint(self) -> str:
        payload = {
            "sources": [s.to_dict() for s in self.sources],
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "max_train_tokens": self.max_train_tokens,
            "tokenizer": getattr(self, "_tokenizer_fp", None),
        }
        # only when they differ from the defaults, so checkpoints written before they existed still match
        if self.bos_id is not None:
            payload["bos"] = self.bos_id
        if self.on_exhausted != "stop":
            payload["on_exhausted"] = self.on_exhausted
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ lightning hooks

    def prepare_data(self) -> None:
        """Tokenize and pack in-memory sources into the cache (once per node; nothing to do
        once :meth:`setup` or :meth:`check_data` has run)."""
        tokenizer = self._require_tokenizer()
        if self.streaming or self.train_dataset is not None:
            return
        for src in self.sources:
            self._build_packed(src, tokenizer)

    def _build_packed(self, src: SourceConfig, tokenizer) -> PackedSource:
        return build_packed_source(
            src, tokenizer, self.seq_len, cache_dir=self.cache_dir,
            val_fraction=self.val_fraction, val_tokens=self.val_tokens, bos_id=self.bos_id,
        )

    def check_data(self, require_validation: bool = True) -> None:
        """Read, tokenize and pack the data now and raise one ``ValueError`` saying what to
        change when it cannot train: a bad row (naming file, line or row, and field), fewer
        sequences than one batch, no validation sequence (``require_validation``).

        In-memory sources are read in full and cached, so training does not read them
        again; streaming sources are checked on their held-out head and on the chunks of the
        first batch (a bad row further on is reported when training reaches it).
        """
        self.setup("fit")
        if self.streaming:
            need = self.batch_size * self._rank_world()[1]
            got = self.train_dataset.first_chunks(need)
            if got < need:
                self._raise_no_batch(got)
        if require_validation and not self.val_indices:
            raise ValueError(self._no_validation_message())

    def setup(self, stage: str | None = None) -> None:
        """Load packed sources (building them if needed) and build datasets and samplers."""
        tokenizer = self._require_tokenizer()
        if self.train_dataset is not None:
            return
        if self.streaming:
            self._setup_streaming(tokenizer)
        else:
            self._setup_in_memory(tokenizer)

    def _setup_in_memory(self, tokenizer) -> None:
        self._packed = [self._build_packed(src, tokenizer) for src in self.sources]
        sizes = [p.train.n_chunks for p in self._packed]
        weights = [s.weight for s in self.sources]
        budgets = [None if s.max_tokens is None else s.max_tokens // self.seq_len for s in self.sources]
        total = None if self.max_train_tokens is None else self.max_train_tokens // self.seq_len
        self.available_chunks = sizes
        self.counts = mixture_counts(sizes, weights, budgets, total, self.on_exhausted)
        empty = [s.name for s, c in zip(self.sources, self.counts) if c == 0]
        if sum(self.counts) == 0:
            read = ", ".join(f"{p.name!r}: {p.meta['train_tokens_read']} tokens" for p in self._packed)
            raise ValueError(
                f"no training sequences of seq_len={self.seq_len}: the training text ({read}) does not fill "
                f"one sequence; lower seq_len or add text"
            )
        if empty:
            warnings.warn(
                f"data sources {empty} contribute no training sequences (too short for seq_len={self.seq_len})",
                stacklevel=2,
            )
        planned = planned_weighted_chunks(sizes, weights, budgets, total)
        if self.on_exhausted == "renormalise":  # shares by plan; a source that runs dry drops out
            labels = renormalised_order(self.counts, [c if p is None else p for c, p in zip(self.counts, planned)],
                                        self.seed)
        else:
            labels = interleave(self.counts, self.seed)
        rank, world = self._rank_world()
        self.train_dataset = PackedChunks([p.train for p in self._packed], self.document_mask)
        self.sampler = MixtureSampler(
            sizes, self.counts, batch_size=self.batch_size, seed=self.seed, shuffle=self.shuffle,
            drop_last=self.drop_last, rank=rank, world_size=world, labels=labels,
        )
        if self.sampler.batches_per_epoch() == 0:
            self._raise_no_batch(sum(self.counts), world)
        if rank == 0:
            self._report_dry_sources(sizes, planned, labels)
        self._val_read = [(p.meta["val_documents"], p.meta["val_tokens_read"],
                           "carved" if p.meta["validation"] == "carved" else p.meta["validation"][len("split:"):],
                           p.meta["train_documents"] + p.meta["val_documents"])
                          for p in self._packed]
        self._build_val([p.val for p in self._packed])
        self._apply_resume()

    def _setup_streaming(self, tokenizer) -> None:
        # Every source is read as a stream. Validation: the dedicated split when there is one,
        # else the head of the stream (``val_tokens``, default 16 sequences), which training skips.
        val_streams = []
        skip_docs = []
        eos = tokenizer.eos_token_id
        val_target = self.val_tokens if self.val_tokens is not None else 16 * self.seq_len
        self._val_read = []
        for src in self.sources:
            dedicated = _dedicated_val_split(src)
            docs = _tokenized_docs(
                iter_documents(src, tokenizer, dedicated or src.split, cache_dir=self.cache_dir), tokenizer, val_target,
                label=f"{src.name} (validation)", bos_id=self.bos_id,
            ) if val_target > 0 else []
            skip_docs.append(0 if dedicated else len(docs))
            val_streams.append(pack_documents(docs, eos, self.seq_len, token_dtype(len(tokenizer))))
            self._val_read.append((len(docs), sum(len(d) + 1 for d in docs), dedicated or "stream head", None))
        if len(self.sources) == 1:
            shares = [1.0]
        elif all(s.weight is not None for s in self.sources):
            shares = [float(s.weight) for s in self.sources]
        else:
            shares = [float(s.max_tokens) for s in self.sources]
        budgets = [None if s.max_tokens is None else s.max_tokens // self.seq_len for s in self.sources]
        total = None if self.max_train_tokens is None else self.max_train_tokens // self.seq_len
        rank, world = self._rank_world()
        self.available_chunks = [None] * len(self.sources)
        # planned chunks per epoch: budgets, or the weights' shares of max_train_tokens (None: unknown)
        if all(b is not None for b in budgets):
            self.counts = list(budgets)
        elif total is not None:
            self.counts = mixture_counts([total] * len(shares), shares, [None] * len(shares), total)
        else:
            self.counts = [None] * len(self.sources)
        self.train_dataset = StreamingMixture(
            self.sources, tokenizer, seq_len=self.seq_len, batch_size=self.batch_size, shares=shares,
            budgets=budgets, on_exhausted=self.on_exhausted, total_chunks=total,
            planned=None if total is None else planned_weighted_chunks([total] * len(shares), shares, budgets, total),
            skip_docs=skip_docs, seed=self.seed, shuffle=self.shuffle, shuffle_buffer=self.shuffle_buffer,
            drop_last=self.drop_last, document_mask=self.document_mask, cache_dir=self.cache_dir,
            rank=rank, world_size=world, bos_id=self.bos_id,
        )
        self._build_val(val_streams)
        self._apply_resume()

    def _raise_no_batch(self, sequences: int, world: int = 1) -> None:
        devices = f" x {world} devices" if world > 1 else ""
        raise ValueError(
            f"no full training batch: the data gives {sequences} training sequences of seq_len={self.seq_len} "
            f"per epoch, fewer than batch_size={self.batch_size}{devices}; lower batch_size or seq_len, or add data"
        )

    def _no_validation_message(self) -> str:
        if self.val_sequences == 0:
            return "no validation sequences: val_sequences=0; set it to null (all) or a positive number"
        held = []
        for src, (docs, tokens, how, total_docs) in zip(self.sources, self._val_read):
            note = " (a source of one document cannot hold one out)" if how == "carved" and total_docs == 1 else ""
            held.append(f"{src.name!r} holds out {tokens} tokens in {docs} documents ({how}){note}")
        return (
            f"no validation sequences of seq_len={self.seq_len}: " + "; ".join(held) + ". Validation needs "
            f"at least one full sequence: lower seq_len, raise val_fraction or val_tokens, add documents, "
            f"or give a hub source its own held-out split (val_split)"
        )

    def _report_dry_sources(self, sizes: list[int], planned: list[float | None], labels: np.ndarray) -> None:
        """Log every weighted source holding fewer sequences than its share of the planned epoch."""
        n, T, B = len(labels), self.seq_len, self.batch_size
        planned_total = sum(c if p is None else p for c, p in zip(self.counts, planned))
        for i, (src, have, plan) in enumerate(zip(self.sources, sizes, planned)):
            if plan is None or have >= math.floor(plan + 1e-9):
                continue
            where = np.flatnonzero(labels == i)
            if self.on_exhausted == "stop":
                at, action = n, f"the epoch ends (planned: {planned_total:,.0f} sequences)"
            elif self.on_exhausted == "restart":
                at = int(where[have]) if 0 < have < len(where) else n
                action = f"it is read again from its start ({self.counts[i] / max(have, 1):.2f} passes per epoch)"
            else:
                at = int(where[-1]) + 1 if len(where) else 0
                action = "the other sources go on with their weights renormalised"
            log.warning(
                "data source %r runs dry: it holds %s tokens (%d sequences of %d) but its planned share is %s "
                "tokens; after %d sequences (%d batches) of each epoch %s (on_exhausted=%s)",
                src.name, f"{have * T:,}", have, T, f"{plan * T:,.0f}", at, at // B, action, self.on_exhausted,
            )

    def _build_val(self, streams: list[PackedStream]) -> None:
        self.val_dataset = PackedChunks(streams, self.document_mask)
        sizes = self.val_dataset.sizes
        labels = interleave(sizes, self.seed)
        seen = [0] * len(sizes)
        indices = []
        for label in labels.tolist():
            indices.append(int(self.val_dataset.offsets[label]) + seen[label])
            seen[label] += 1
        if self.val_sequences is not None:
            indices = indices[: self.val_sequences]
        self.val_indices = indices
        if not indices:
            warnings.warn("the data module has no validation sequences (too little held-out text for seq_len?)", stacklevel=2)

    # ------------------------------------------------------------------ loaders

    def calibration_batch(self, n: int) -> torch.Tensor:
        """``input_ids`` (at most ``n`` x ``seq_len``) of the first ``n`` training sequences of
        epoch 0, on every process the same (a data-aware init's calibration batch).

        In-memory sources: the first ``n`` of epoch 0's order (what training sees first, whatever
        the resume position). Streaming mixtures: the first ``n`` sequences of the mixture before
        the shuffle buffer. The training order and position are not touched.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"calibration_batch needs n >= 1 sequences, got {n!r}")
        if self.train_dataset is None:
            self.setup("fit")
        if self.streaming:
            ds = self.train_dataset
            epoch = ds.epoch
            try:
                ds.set_epoch(0)
                rows = [tokens for _, tokens, _ in itertools.islice(ds.iter_chunks(buffered=False), n)]
            finally:
                ds.set_epoch(epoch)
        else:
            rows = [self.train_dataset[int(i)]["input_ids"].numpy() for i in self.sampler.epoch_order(0)[:n]]
        if not rows:
            raise ValueError("calibration_batch: the training data has no sequence")
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def _trainer_epoch(self) -> int | None:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return None
        try:
            return int(trainer.fit_loop.epoch_progress.current.processed)
        except AttributeError:
            return None

    def train_dataloader(self) -> ResumableDataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        common = dict(
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            state_fn=self.state_dict,
            load_fn=self.load_state_dict,
            epoch_fn=self._trainer_epoch,
            persistent_workers=False,
        )
        rank, world = self._rank_world()
        target = self.train_dataset if self.streaming else self.sampler
        target.rank, target.world_size = rank, world
        if not self.streaming:
            self.sampler.set_rank(rank, world)
            if self.sampler.batches_per_epoch() == 0:  # setup may have run before the trainer was attached
                self._raise_no_batch(sum(self.counts), world)
        if self.streaming:
            assert isinstance(self.train_dataset, StreamingMixture)
            loader = ResumableDataLoader(self.train_dataset, batch_size=None, position_target=self.train_dataset, **common)
        else:
            assert self.sampler is not None
            loader = ResumableDataLoader(
                self.train_dataset, batch_size=self.batch_size, sampler=self.sampler,
                drop_last=self.drop_last, position_target=self.sampler, **common,
            )
        self._train_loader = loader
        return loader

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None:
            self.setup("validate")
        if not self.val_indices:
            return []
        # a Subset read sequentially (not a custom sampler): Lightning sees an unshuffled loader
        return DataLoader(
            Subset(self.val_dataset, list(self.val_indices)), batch_size=self.val_batch_size, shuffle=False,
            num_workers=self.num_workers, pin_memory=self.pin_memory, drop_last=False,
        )

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the next training iteration (manual loops; Lightning does this itself)."""
        target = self.sampler if not self.streaming else self.train_dataset
        target.set_epoch(epoch)

    # ------------------------------------------------------------------ statistics

    @property
    def tokens_per_source(self) -> dict[str, int | None]:
        """Planned training tokens per source per epoch.

        Exact for in-memory sources (with ``on_exhausted=restart`` a count can exceed what the
        source holds: it is read again). Streaming mixtures: the budgets or the weights' shares
        of ``max_train_tokens`` (a plan: a weighted stream that runs dry ends the epoch early,
        is read again or leaves the others more room, as ``on_exhausted`` says, and is
        reported in the log); None when neither is known. Actual counts: sum ``seq_len`` per
        ``batch["source_ids"]`` entry.
        """
        if not self.counts:
            return {}
        return {s.name: (None if c is None else c * self.seq_len) for s, c in zip(self.sources, self.counts)}

    @property
    def val_tokens_per_source(self) -> dict[str, int]:
        """Validation tokens per source (after the ``val_sequences`` cap)."""
        if self.val_dataset is None:
            return {}
        out = {s.name: 0 for s in self.sources}
        for idx in self.val_indices:
            out[self.sources[self.val_dataset.locate(idx)[0]].name] += self.seq_len
        return out

    # ------------------------------------------------------------------ resume state

    def _position(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None and self._train_loader is not None:
            try:
                from lightning.pytorch.trainer.states import TrainerFn

                if trainer.state.fn == TrainerFn.FITTING:
                    # Lightning may prefetch a batch; its own progress counts consumed ones.
                    return (
                        int(trainer.fit_loop.epoch_progress.current.processed),
                        int(trainer.fit_loop.epoch_loop.batch_progress.current.ready),
                    )
            except AttributeError:
                pass
        if self._train_loader is not None:
            return self._train_loader.position
        if self._resume is not None:
            return int(self._resume["epoch"]), int(self._resume["batches_consumed"])
        return 0, 0

    def state_dict(self) -> dict[str, Any]:
        """``{"version", "epoch", "batches_consumed", "fingerprint", "seed"}`` of the training stream."""
        epoch, consumed = self._position()
        return {
            "version": STATE_VERSION,
            "epoch": epoch,
            "batches_consumed": consumed,
            "fingerprint": self._mixture_fingerprint(),
            "seed": self.seed,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Resume: the next iteration of epoch ``epoch`` starts after ``batches_consumed`` batches."""
        if not state_dict:
            return
        if int(state_dict.get("version", 0)) != STATE_VERSION:
            raise ValueError(f"unsupported TokenMixDataModule state version {state_dict.get('version')!r}")
        self._resume = {
            "epoch": int(state_dict["epoch"]),
            "batches_consumed": int(state_dict["batches_consumed"]),
            "fingerprint": state_dict.get("fingerprint"),
        }
        self._apply_resume()

    def _apply_resume(self) -> None:
        if self._resume is None:
            return
        target = self.train_dataset if self.streaming else self.sampler
        if target is None:
            return  # applied in setup()
        fp = self._resume.get("fingerprint")
        if fp is not None and self.tokenizer is not None and fp != self._mixture_fingerprint():
            warnings.warn(
                "resuming TokenMixDataModule with a different data configuration than the checkpoint's; "
                "the position is kept but the batches will differ from the original run", stacklevel=2)
        target.set_epoch(self._resume["epoch"])
        target.set_resume(self._resume["epoch"], self._resume["batches_consumed"])
        if self._train_loader is not None:
            self._train_loader.position = (self._resume["epoch"], self._resume["batches_consumed"])
