"""Tokenize, pack and mix: pure functions over token arrays.

Packing convention (used everywhere in :mod:`lrc.data`):

* every document is tokenized **without** special tokens and followed by one
  ``eos`` token; documents are concatenated into one stream per source
  (cross-document packing, no padding);
* the stream is cut into chunks of **exactly** ``seq_len`` tokens. The model
  computes next-token losses on the shifted chunk internally (``seq_len - 1``
  targets per chunk), so no extra label token is stored. Tokens after the last
  full chunk (fewer than ``seq_len``) are dropped;
* a chunk's **segment ids** number the documents inside it: 0 for the first
  (possibly partial) document, +1 at every document start inside the chunk.
  An ``eos`` belongs to the document it ends. Two positions may attend to each
  other under a document mask iff their segment ids are equal.

Mixing: sources are packed separately, so every chunk belongs to one source.
:func:`mixture_counts` decides how many chunks each source contributes and
:func:`interleave` orders them so that every prefix of the mixture holds each
source's share to within one chunk.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np

__all__ = [
    "OnlineInterleaver",
    "PackedStream",
    "StreamPacker",
    "chunk_count",
    "interleave",
    "iter_chunks_from_documents",
    "mixture_counts",
    "pack_documents",
    "position_ids_from_segments",
    "segment_ids",
    "seeded_rng",
    "token_dtype",
    "tokenize_documents",
]


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype holding ids ``< vocab_size`` (uint16 up to 65536 ids)."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def seeded_rng(*keys: int | str) -> np.random.Generator:
    """A numpy generator seeded from any tuple of ints/strings (stable across runs and platforms)."""
    digest = hashlib.sha256("\x1f".join(str(k) for k in keys).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def tokenize_documents(texts: Sequence[str], tokenizer, batch_size: int = 256) -> list[list[int]]:
    """Token ids of each text, without special tokens (no bos/eos added)."""
    out: list[list[int]] = []
    for start in range(0, len(texts), batch_size):
        batch = list(texts[start : start + batch_size])
        if batch:
            out.extend(tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"])
    return out


@dataclass
class PackedStream:
    """A source's packed tokens.

    Attributes:
        tokens: 1-D array of ``n_chunks * seq_len`` token ids (documents + eos, concatenated).
        doc_starts: sorted positions in ``tokens`` where a document starts (``int64``).
        seq_len: chunk length.
    """

    tokens: np.ndarray
    doc_starts: np.ndarray
    seq_len: int

    @property
    def n_chunks(self) -> int:
        return len(self.tokens) // self.seq_len

    def chunk(self, i: int) -> np.ndarray:
        """Tokens of chunk ``i`` (a view)."""
        return self.tokens[i * self.seq_len : (i + 1) * self.seq_len]

    def chunk_segments(self, i: int) -> np.ndarray:
        """Segment ids of chunk ``i``."""
        return segment_ids(self.doc_starts, i * self.seq_len, self.seq_len)


def chunk_count(n_tokens: int, seq_len: int) -> int:
    """Number of full chunks in a stream of ``n_tokens`` tokens."""
    return n_tokens // seq_len


def pack_documents(
    token_lists: Iterable[Sequence[int]],
    eos_id: int,
    seq_len: int,
    dtype: np.dtype | type = np.int64,
) -> PackedStream:
    """Concatenate documents, each followed by ``eos_id``, and keep whole ``seq_len`` chunks.

    >>> p = pack_documents([[1, 2], [3]], eos_id=0, seq_len=2)
    >>> p.tokens.tolist(), p.doc_starts.tolist()
    ([1, 2, 0, 3], [0, 3])
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    lengths = []
    pieces = []
    eos = np.array([eos_id], dtype=dtype)
    for ids in token_lists:
        arr = np.asarray(ids, dtype=dtype)
        pieces.append(arr)
        pieces.append(eos)
        lengths.append(len(arr) + 1)
    if not pieces:
        return PackedStream(np.zeros(0, dtype=dtype), np.zeros(0, dtype=np.int64), seq_len)
    flat = np.concatenate(pieces)
    starts = np.concatenate([[0], np.cumsum(lengths[:-1], dtype=np.int64)]).astype(np.int64)
    usable = (len(flat) // seq_len) * seq_len
    return PackedStream(flat[:usable], starts[starts < usable], seq_len)


def segment_ids(doc_starts: np.ndarray, start: int, length: int) -> np.ndarray:
    """Segment ids of positions ``[start, start + length)`` given sorted document starts."""
    positions = np.arange(start, start + length, dtype=np.int64)
    first = np.searchsorted(doc_starts, start, side="right")
    return (np.searchsorted(doc_starts, positions, side="right") - first).astype(np.int64)


def position_ids_from_segments(segments: np.ndarray) -> np.ndarray:
    """Positions restarting at 0 at every segment change (for document-masked attention).

    Works on ``[T]`` or ``[B, T]`` arrays.
    """
    seg = np.asarray(segments)
    flat = seg.reshape(-1, seg.shape[-1])
    out = np.empty_like(flat)
    for row, s in enumerate(flat):
        idx = np.arange(len(s))
        change = np.concatenate([[True], s[1:] != s[:-1]])
        starts = np.maximum.accumulate(np.where(change, idx, 0))
        out[row] = idx - starts
    return out.reshape(seg.shape)


class StreamPacker:
    """Incremental version of :func:`pack_documents` for streams that do not fit in memory.

    ``feed(ids)`` appends one document (+ eos) and returns the chunks completed by it as
    ``(tokens, segment_ids)`` pairs (``int32`` tokens, ``int64`` segment ids); the output
    equals :func:`pack_documents` on the same documents, chunk by chunk.
    """

    def __init__(self, eos_id: int, seq_len: int) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.eos_id = eos_id
        self.seq_len = seq_len
        self._buf: list[int] = []
        self._starts: list[int] = []  # document starts inside the buffer

    def feed(self, ids: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        self._starts.append(len(self._buf))
        self._buf.extend(ids)
        self._buf.append(self.eos_id)
        out = []
        T = self.seq_len
        while len(self._buf) >= T:
            tokens = np.asarray(self._buf[:T], dtype=np.int32)
            starts = np.asarray(self._starts, dtype=np.int64)
            out.append((tokens, segment_ids(starts, 0, T)))
            del self._buf[:T]
            # The document running over the cut continues at position 0 of the next chunk:
            # it is segment 0 there, which is what dropping its (old) start achieves.
            self._starts = [s - T for s in self._starts if s >= T]
        return out


# --------------------------------------------------------------------------- mixing


def _largest_remainder(shares: Sequence[float], total: int, caps: Sequence[int]) -> list[int]:
    """Integers proportional to ``shares`` summing to ``total`` (capped per entry)."""
    s = float(sum(shares))
    if total <= 0 or s <= 0:
        return [0] * len(shares)
    raw = [total * x / s for x in shares]
    out = [min(int(math.floor(r)), c) for r, c in zip(raw, caps)]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - math.floor(raw[i])), i))
    left = total - sum(out)
    for i in order:
        if left <= 0:
            break
        if out[i] < caps[i]:
            out[i] += 1
            left -= 1
    return out


def mixture_counts(
    available: Sequence[int],
    weights: Sequence[float | None],
    budgets: Sequence[int | None],
    total: int | None = None,
) -> list[int]:
    """Chunks each source contributes to one epoch.

    Args:
        available: chunks each source has.
        weights: mixture weight per source, or None.
        budgets: chunk budget per source (``max_tokens // seq_len``), or None.
        total: optional cap on the total number of chunks (``max_train_tokens // seq_len``).

    Rules: a source with a budget contributes ``min(available, budget)``. Sources with a
    weight share the rest in proportion to their weights, as many chunks as possible
    without repeating any chunk (the scarcest source, relative to its weight, sets the
    size). A source with neither contributes everything it has. If ``total`` is exceeded,
    all counts are scaled down proportionally (largest remainder) to sum to ``total``.
    """
    n = len(available)
    if not (len(weights) == len(budgets) == n):
        raise ValueError("available, weights and budgets must have the same length")
    counts = [0] * n
    weighted = [i for i in range(n) if weights[i] is not None and budgets[i] is None]
    for i in range(n):
        if budgets[i] is not None:
            counts[i] = min(int(available[i]), int(budgets[i]))
        elif weights[i] is None:
            counts[i] = int(available[i])
    if weighted:
        wsum = sum(float(weights[i]) for i in weighted)
        size = min(available[i] * wsum / float(weights[i]) for i in weighted)
        size = int(math.floor(size + 1e-9))
        part = _largest_remainder([float(weights[i]) for i in weighted], size, [int(available[i]) for i in weighted])
        for i, c in zip(weighted, part):
            counts[i] = c
    if total is not None and sum(counts) > total:
        counts = _largest_remainder(counts, int(total), counts)
    return counts


def interleave(counts: Sequence[int], seed: int = 0) -> np.ndarray:
    """Source label of each position of a mixture with exactly ``counts[i]`` items of source ``i``.

    Greedy largest-deficit schedule: position ``t`` goes to the source that is most behind
    its share (``p_i * (t + 1) - taken_i``), ties broken by a seeded source priority. Every
    prefix of length ``t`` then holds ``p_i * t`` items of source ``i`` to within one item.
    """
    counts = [int(c) for c in counts]
    total = sum(counts)
    k = len(counts)
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    live = [i for i in range(k) if counts[i] > 0]
    if len(live) == 1:
        return np.full(total, live[0], dtype=np.int64)
    priority = seeded_rng("interleave", seed).permutation(k).tolist()
    shares = [c / total for c in counts]
    taken = [0] * k
    out = np.empty(total, dtype=np.int64)
    for t in range(total):
        best, best_key = -1, None
        for i in live:
            if taken[i] < counts[i]:
                key = (shares[i] * (t + 1) - taken[i], -priority[i])
                if best_key is None or key > best_key:
                    best, best_key = i, key
        out[t] = best
        taken[best] += 1
    return out


class OnlineInterleaver:
    """The :func:`interleave` rule for streams of unknown length: call :meth:`next` per item.

    ``shares`` are normalised weights; ``exclude(i)`` removes an exhausted source.
    """

    def __init__(self, shares: Sequence[float], seed: int = 0) -> None:
        s = float(sum(shares))
        if s <= 0:
            raise ValueError("mixture shares must sum to a positive number")
        self.shares = [x / s for x in shares]
        self.priority = seeded_rng("interleave", seed).permutation(len(shares)).tolist()
        self.taken = [0] * len(shares)
        self.t = 0
        self.live = [i for i, x in enumerate(self.shares) if x > 0]

    def next(self) -> int | None:
        if not self.live:
            return None
        t = self.t
        best = max(self.live, key=lambda i: (self.shares[i] * (t + 1) - self.taken[i], -self.priority[i]))
        self.taken[best] += 1
        self.t += 1
        return best

    def exclude(self, i: int) -> None:
        if i in self.live:
            self.live.remove(i)


def iter_chunks_from_documents(
    token_lists: Iterable[Sequence[int]], eos_id: int, seq_len: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(tokens, segment_ids)`` chunks of a document stream, packed incrementally."""
    packer = StreamPacker(eos_id, seq_len)
    for ids in token_lists:
        yield from packer.feed(ids)
