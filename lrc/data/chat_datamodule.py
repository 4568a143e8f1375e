"""``ChatDataModule``: conversations for supervised fine-tuning, with exact mid-epoch resume.

Every source is a :class:`~lrc.data.sources.SourceConfig` whose rows hold a conversation in
``messages_field`` (default ``messages``): a list of ``{"role", "content"}`` messages
(ultrachat_200k) or, with ``message_keys: {role: from, content: value}`` and a ``role_map``
(:data:`~lrc.data.sources.SHAREGPT`), ShareGPT's ``{"from", "value"}`` (OpenHermes-2.5). Local
JSON / JSON-lines / parquet files, a hub dataset and the ``chatterbot`` corpus all work. A bad
row is named by source, file and line (or row) and field, before training.

Each conversation is rendered with the tokenizer's chat template and labelled on its assistant
turns only (:func:`lrc.data.chat.render_with_labels`), then packed into rows of ``seq_len``
tokens with segment ids, or one per row (:func:`lrc.data.chat.pack_conversations`). Each source
holds out its dedicated ``val_split`` (hub) or its last ``val_fraction`` of conversations for
validation. Training rows of all sources are read in a deterministic per-epoch order
(:class:`~lrc.data.in_memory.MixtureSampler`, every row once per epoch), resumable exactly
mid-epoch (:class:`~lrc.data.resume.ResumableDataModule`).

Batches::

    {"input_ids":      LongTensor[B, T],
     "labels":         LongTensor[B, T],   # -100 except on assistant tokens (aligned with input_ids)
     "attention_mask": LongTensor[B, T],   # 0 on padding
     "segment_ids":    LongTensor[B, T],   # one id per conversation in the row (document mask)
     "source_ids":     LongTensor[B]}      # index into datamodule.source_names
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import Dataset

from lrc.data.cache import tokenizer_fingerprint
from lrc.data.chat import ChatRows, pack_conversations, render_with_labels
from lrc.data.in_memory import InMemoryMixture, MixtureSampler
from lrc.data.loaders import MixtureDataModule, load_tokenizer
from lrc.data.resume import ResumableDataLoader
from lrc.data.sources import RowError, SourceConfig, get_field, iter_located_rows, normalize_messages, validate_source

__all__ = ["ChatDataModule", "ChatDataset", "read_conversations"]

log = logging.getLogger(__name__)
CHAT_KINDS = ("hub", "jsonl", "parquet", "chatterbot")


def chat_source(obj: SourceConfig | Mapping[str, Any]) -> SourceConfig:
    """A source of conversations (``messages_field`` defaults to ``messages``), validated."""
    src = SourceConfig.from_any(obj)
    if src.kind not in CHAT_KINDS:
        raise ValueError(f"chat data source {src.name!r}: kind must be one of {CHAT_KINDS}, got {src.kind!r}")
    for key in ("weight", "max_tokens", "streaming"):
        if getattr(src, key):
            raise ValueError(f"chat data source {src.name!r}: {key} is not supported (every conversation is used once per epoch)")
    if not src.messages_field:
        src = dataclasses.replace(src, messages_field="messages")
    validate_source(src)
    return src


def read_conversations(src: SourceConfig, tokenizer: Any, split: str, cache_dir: Any = None) -> list[tuple[list[int], list[int]]]:
    """``(input_ids, labels)`` of every conversation of ``src``'s ``split``; a bad row raises one
    ``ValueError`` naming the source, the file and line (or row) and the problem."""
    out = []
    for where, row in iter_located_rows(src, split, cache_dir=cache_dir):
        try:
            messages = normalize_messages(get_field(row, src.messages_field), src)
            out.append(render_with_labels(messages, tokenizer))
        except (RowError, ValueError) as err:
            raise ValueError(f"data source {src.name!r}: {where}: {err}") from None
    return out


class ChatDataset(Dataset):
    """Map-style dataset over the packed rows of several sources (global index = offset + row)."""

    def __init__(self, parts: Sequence[ChatRows]) -> None:
        self.parts = list(parts)
        self.sizes = [len(p) for p in self.parts]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(index)
        src = int(np.searchsorted(self.offsets, index, side="right") - 1)
        part, r = self.parts[src], index - int(self.offsets[src])
        item = {k: torch.from_numpy(getattr(part, k)[r].copy())
                for k in ("input_ids", "labels", "attention_mask", "segment_ids")}
        item["source_ids"] = torch.tensor(src, dtype=torch.long)
        return item


class ChatDataModule(MixtureDataModule, LightningDataModule):
    """Conversations rendered with the chat template, labelled on the assistant's tokens, packed.

    Args:
        sources: list of :class:`~lrc.data.sources.SourceConfig` or dicts with its fields; kinds
            ``jsonl`` (JSON lines or a JSON array), ``parquet``, ``hub``, ``chatterbot``.
        tokenizer: a tokenizer with a chat template, a name/path for ``AutoTokenizer``, or None
            (then call :meth:`set_tokenizer`).
        seq_len: tokens per row; longer conversations are cut to their first ``seq_len`` tokens.
        batch_size: rows per training batch (per device).
        packing: several conversations per row (segment ids keep them apart), or one per row.
        val_fraction: share of each source's conversations (its last ones) held out when it has
            no ``val_split``.
        val_sequences: cap on validation rows in total (null: all).
        val_batch_size: validation batch size (default ``batch_size``).
        seed, shuffle, drop_last: the per-epoch order of training rows.
        max_seq_len: the model's maximum context; ``seq_len`` above it is an error.
        num_workers, pin_memory: passed to the dataloaders.
        cache_dir: where hub datasets are cached by ``datasets`` (local files are read directly).
    """

    def __init__(
        self,
        sources: Sequence[SourceConfig | Mapping[str, Any]],
        tokenizer: Any = None,
        seq_len: int = 2048,
        batch_size: int = 8,
        packing: bool = True,
        val_fraction: float = 0.05,
        val_sequences: int | None = None,
        val_batch_size: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        max_seq_len: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if not sources:
            raise ValueError("ChatDataModule needs at least one data source")
        self.sources = [chat_source(s) for s in sources]
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"data source names must be unique; repeated: {dupes}")
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
            raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
        if max_seq_len is not None and seq_len > max_seq_len:
            raise ValueError(f"seq_len={seq_len} exceeds the model's maximum sequence length max_seq_len={max_seq_len}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if val_sequences is not None and (not isinstance(val_sequences, int) or val_sequences < 0):
            raise ValueError(f"val_sequences must be a non-negative integer or null, got {val_sequences!r}")
        self.seq_len, self.batch_size, self.packing = seq_len, batch_size, bool(packing)
        self.val_fraction, self.val_sequences = val_fraction, val_sequences
        self.val_batch_size = val_batch_size or batch_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.max_seq_len, self.num_workers, self.pin_memory = max_seq_len, num_workers, pin_memory
        self.cache_dir = cache_dir
        self.mixture: InMemoryMixture | None = None
        self.train_dataset: ChatDataset | None = None
        self.val_dataset: ChatDataset | None = None
        self.val_indices: list[int] = []
        self.stats: dict[str, dict[str, int]] = {}
        self._train_loader: ResumableDataLoader | None = None
        self._resume: dict | None = None
        self.tokenizer = None
        if tokenizer is not None:
            self.set_tokenizer(tokenizer)

    def set_tokenizer(self, tokenizer: Any) -> None:
        """Set the model's tokenizer (a string is loaded with ``AutoTokenizer``); it needs a chat template."""
        tokenizer = load_tokenizer(tokenizer)
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat_template; chat data is rendered with it")
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token to pad rows with")
        if self.tokenizer is not None and tokenizer_fingerprint(tokenizer) != tokenizer_fingerprint(self.tokenizer):
            self.mixture = self.train_dataset = self.val_dataset = self._train_loader = None
        self.tokenizer = tokenizer

    def _data_fingerprint(self) -> str:
        payload = {
            "sources": [s.to_dict() for s in self.sources], "seq_len": self.seq_len, "batch_size": self.batch_size,
            "packing": self.packing, "seed": self.seed, "shuffle": self.shuffle, "val_fraction": self.val_fraction,
            "tokenizer": None if self.tokenizer is None else tokenizer_fingerprint(self.tokenizer),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ lightning hooks

    def prepare_data(self) -> None:
        """Nothing to do: :meth:`setup` reads, renders and packs the conversations in memory."""

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            raise ValueError("ChatDataModule has no tokenizer: pass tokenizer=... or call set_tokenizer()")
        if self.mixture is not None:
            return
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        train_parts, val_parts = [], []
        for src in self.sources:
            convs = read_conversations(src, tok, src.split, self.cache_dir)
            if src.val_split:
                val = read_conversations(src, tok, src.val_split, self.cache_dir)
            else:
                n_val = math.ceil(self.val_fraction * len(convs)) if len(convs) >= 2 else 0
                convs, val = convs[: len(convs) - n_val], convs[len(convs) - n_val:]
            train = pack_conversations(convs, self.seq_len, pad, self.packing)
            held = pack_conversations(val, self.seq_len, pad, self.packing)
            train_parts.append(train)
            val_parts.append(held)
            self.stats[src.name] = {"train_conversations": train.conversations, "train_rows": len(train),
                                    "truncated": train.truncated + held.truncated,
                                    "dropped": train.dropped + held.dropped,
                                    "val_conversations": held.conversations, "val_rows": len(held)}
            if train.truncated or train.dropped:
                log.warning("chat data source %r: %d conversations cut to seq_len=%d, %d without an assistant token "
                            "within it left out", src.name, train.truncated, self.seq_len, train.dropped)
        sizes = [len(p) for p in train_parts]
        if sum(sizes) == 0:
            raise ValueError(f"no training conversation with an assistant turn in the chat data sources "
                             f"{self.source_names} (seq_len={self.seq_len})")
        rank, world = self._rank_world()
        self.train_dataset = ChatDataset(train_parts)
        sampler = MixtureSampler(sizes, sizes, batch_size=self.batch_size, seed=self.seed, shuffle=self.shuffle,
                                 drop_last=self.drop_last, rank=rank, world_size=world)
        self.mixture = InMemoryMixture(self.train_dataset, sampler, self.seq_len)  # checks one batch fits
        self.val_dataset = ChatDataset(val_parts)
        indices = list(range(len(self.val_dataset)))
        self.val_indices = indices if self.val_sequences is None else indices[: self.val_sequences]
        self._apply_resume()

    def _no_validation_message(self) -> str:
        return (f"no validation conversations: the sources hold out none (val_fraction={self.val_fraction}, "
                f"val_sequences={self.val_sequences}); raise val_fraction, add conversations or set a val_split")

    @property
    def sampler(self) -> MixtureSampler | None:
        return None if self.mixture is None else self.mixture.sampler

    def calibration_batch(self, n: int) -> torch.Tensor:
        """``input_ids`` of the first ``n`` training rows of epoch 0 (the position is kept)."""
        if self.mixture is None:
            self.setup("fit")
        return torch.from_numpy(np.stack(self.mixture.first_sequences(n)).astype(np.int64))
