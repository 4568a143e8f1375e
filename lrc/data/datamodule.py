"""``TokenMixDataModule``: a packed, mixed, exactly resumable token stream for distillation.

Pipeline (see :mod:`lrc.data.sources` and :mod:`lrc.data.packing`; the pieces live in
:mod:`lrc.data.cache` (packed-token cache), :mod:`lrc.data.in_memory` and
:mod:`lrc.data.streaming` (the two kinds of training data, one interface:
:class:`~lrc.data.resume.TrainMixture`) and :mod:`lrc.data.resume` (position and resume state)):

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

Exact mid-epoch resume (:class:`~lrc.data.resume.ResumableDataModule`): :meth:`state_dict` returns
``{"version": 2, "epoch": e, "sequences_consumed": n, "fingerprint": ..., "seed": ...}``
(Lightning stores it in checkpoints; the training dataloader also implements the
``state_dict``/``load_state_dict`` protocol so Lightning's loop restores it too), where ``n``
counts the sequences of epoch ``e`` consumed by every process together. After
:meth:`load_state_dict`, the first iteration of epoch ``e`` skips exactly ``n`` sequences
(``n / (batch_size x world_size)`` batches on each process), so a resumed run sees the same
remaining batches as an uninterrupted one, on the same number of processes or another one
with the same global batch.
Multi-device: each rank takes every ``world_size``-th batch itself (rank and world size
come from the attached trainer); the sampler is a ``DistributedSampler`` subclass, so
Lightning does not wrap it again.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import Dataset

from lrc.data.cache import PackedSource, build_packed_source, dedicated_val_split, tokenized_docs, tokenizer_fingerprint
from lrc.data.corpus import default_cache_dir
from lrc.data.in_memory import InMemoryMixture, MixtureSampler, PackedChunks, report_dry_sources
from lrc.data.packing import (
    BOS_MODES,
    EXHAUSTED_MODES,
    PackedStream,
    bos_to_add,
    interleave,
    mixture_counts,
    pack_documents,
    planned_weighted_chunks,
    renormalised_order,
    token_dtype,
)
from lrc.data.loaders import MixtureDataModule, load_tokenizer
from lrc.data.resume import ResumableDataLoader
from lrc.data.sources import SourceConfig, iter_documents, validate_source
from lrc.data.streaming import StreamingMixture

__all__ = ["TokenMixDataModule"]


class TokenMixDataModule(MixtureDataModule, LightningDataModule):
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
            :func:`~lrc.data.packing.mixture_counts` and :class:`~lrc.data.streaming.StreamingMixture`. It is
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
        self.mixture: InMemoryMixture | StreamingMixture | None = None  # the training data
        self.train_dataset: Dataset | None = None  # the mixture's dataset (the mixture itself when streaming)
        self.sampler: MixtureSampler | None = None  # in-memory sources only
        self.val_dataset: PackedChunks | None = None
        self.val_indices: list[int] = []
        self._train_loader: ResumableDataLoader | None = None
        self._resume: dict | None = None
        self.counts: list[int | None] = []
        self.available_chunks: list[int | None] = []
        self.tokenizer = None
        if tokenizer is not None:
            self.set_tokenizer(tokenizer)

    # ------------------------------------------------------------------ configuration

    def set_tokenizer(self, tokenizer: Any) -> None:
        """Set the (teacher's) tokenizer; a string is loaded with ``AutoTokenizer``."""
        tokenizer = load_tokenizer(tokenizer)
        if getattr(tokenizer, "eos_token_id", None) is None:
            raise ValueError("the tokenizer has no eos_token_id; packing needs one to separate documents")
        for src in self.sources:
            validate_source(src, tokenizer, check_data=False)
        bos_id = bos_to_add(tokenizer, self.add_bos)
        fp = tokenizer_fingerprint(tokenizer)
        if (getattr(self, "_tokenizer_fp", fp), self.bos_id) != (fp, bos_id):  # rebuild on next setup
            self.mixture = self.train_dataset = self.val_dataset = self.sampler = self._train_loader = None
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

    def _data_fingerprint(self) -> str:
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
        if self.streaming or self.mixture is not None:
            return
        for src in self.sources:
            self._build_packed(src, tokenizer)

    def _build_packed(self, src: SourceConfig, tokenizer) -> PackedSource:
        return build_packed_source(
            src, tokenizer, self.seq_len, cache_dir=self.cache_dir,
            val_fraction=self.val_fraction, val_tokens=self.val_tokens, bos_id=self.bos_id,
        )

    def setup(self, stage: str | None = None) -> None:
        """Load packed sources (building them if needed) and build datasets and samplers."""
        tokenizer = self._require_tokenizer()
        if self.mixture is not None:
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
        self.mixture = InMemoryMixture(self.train_dataset, self.sampler, self.seq_len)  # checks one batch fits
        if rank == 0:
            report_dry_sources(self.source_names, self.counts, sizes, planned, labels, seq_len=self.seq_len,
                               batch_size=self.batch_size, on_exhausted=self.on_exhausted)
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
            dedicated = dedicated_val_split(src)
            docs = tokenized_docs(
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
        self.mixture = self.train_dataset = StreamingMixture(
            self.sources, tokenizer, seq_len=self.seq_len, batch_size=self.batch_size, shares=shares,
            budgets=budgets, on_exhausted=self.on_exhausted, total_chunks=total,
            planned=None if total is None else planned_weighted_chunks([total] * len(shares), shares, budgets, total),
            skip_docs=skip_docs, seed=self.seed, shuffle=self.shuffle, shuffle_buffer=self.shuffle_buffer,
            drop_last=self.drop_last, document_mask=self.document_mask, cache_dir=self.cache_dir,
            rank=rank, world_size=world, bos_id=self.bos_id,
        )
        self._build_val(val_streams)
        self._apply_resume()

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
        if self.mixture is None:
            self.setup("fit")
        rows = self.mixture.first_sequences(n)
        if not rows:
            raise ValueError("calibration_batch: the training data has no sequence")
        return torch.from_numpy(np.stack(rows).astype(np.int64))

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
