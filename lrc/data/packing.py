"""Tokenize, pack and mix: pure functions over token arrays.

Packing convention (used everywhere in :mod:`lrc.data`):

* every document is tokenized **without** special tokens and followed by one
  ``eos`` token; with ``bos_id`` (see :func:`bos_to_add`) it also starts with one
  ``bos`` token, unless its text already renders it (chat templates such as
  Llama-3's); documents are concatenated into one stream per source
  (cross-document packing, no padding);
* the stream is cut into chunks of **exactly** ``seq_len`` tokens. The model
  computes next-token losses on the shifted chunk internally (``seq_len - 1``
  targets per chunk), so no extra label token is stored. Tokens after the last
  full chunk (fewer than ``seq_len``) are dropped;
* a chunk's **segment ids** number the documents inside it: 0 for the first
  (possibly partial) document, +1 at every document start inside the chunk.
  An ``eos`` belongs to the document it ends, a ``bos`` to the one it starts. Two
  positions may attend to each other under a document mask iff their segment ids
  are equal.

Mixing: sources are packed separately, so every chunk belongs to one source.
:func:`mixture_counts` decides how many chunks each source contributes and
:func:`interleave` orders them so that every prefix of the mixture holds each
source's share to within one chunk.

A weighted source can hold fewer chunks than its share of the epoch (``on_exhausted``,
one of :data:`EXHAUSTED_MODES`): ``stop`` ends the epoch when it runs dry (no chunk is
repeated), ``restart`` reads it again from its start (the shares hold to the end of the
epoch, which comes when every weighted source has been read to its end at least once),
``renormalise`` lets the remaining sources go on with their weights renormalised
(:func:`renormalised_order`; every chunk is used once).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

__all__ = [
    "EXHAUSTED_MODES",
    "Lookahead",
    "OnlineInterleaver",
    "PackedStream",
    "StreamPacker",
    "bos_to_add",
    "interleave",
    "mixture_counts",
    "pack_documents",
    "planned_weighted_chunks",
    "position_ids_from_segments",
    "renormalised_order",
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


EXHAUSTED_MODES = ("stop", "restart", "renormalise")
BOS_MODES = ("auto", True, False)


def bos_to_add(tokenizer, add_bos: str | bool = "auto") -> int | None:
    """The token id to put at every document start, or None.

    ``auto`` follows the tokenizer's own convention: on when encoding with special tokens
    prepends its ``bos_token`` and that token differs from ``eos`` (Llama-3's
    ``<|begin_of_text|>``, Llama-2, Gemma, Mistral); off for tokenizers that define a bos
    token they never add (SmolLM2-Instruct's ``<|im_start|>``) or none at all (Qwen).
    ``True`` adds the tokenizer's ``bos_token`` (an error when it has none), ``False`` never.
    """
    if add_bos not in BOS_MODES or not isinstance(add_bos, (str, bool)):
        raise ValueError(f"add_bos must be one of auto, true, false; got {add_bos!r}")
    bos = getattr(tokenizer, "bos_token_id", None)
    if add_bos is False:
        return None
    if add_bos is True:
        if bos is None:
            raise ValueError("add_bos=true but the tokenizer has no bos_token")
        return int(bos)
    if bos is None or bos == getattr(tokenizer, "eos_token_id", None):
        return None
    probe = tokenizer("x", add_special_tokens=True)["input_ids"]
    return int(bos) if probe and probe[0] == bos else None


def tokenize_documents(
    texts: Sequence[str], tokenizer, batch_size: int = 256, bos_id: int | None = None
) -> list[list[int]]:
    """Token ids of each text, without the tokenizer's special tokens; with ``bos_id``, each
    document starts with it (once: a text that already renders it keeps its own)."""
    out: list[list[int]] = []
    for start in range(0, len(texts), batch_size):
        batch = list(texts[start : start + batch_size])
        if batch:
            out.extend(tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"])
    if bos_id is not None:
        out = [ids if ids[:1] == [bos_id] else [bos_id, *ids] for ids in out]
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


def _fits(weights: Sequence[float], available: Sequence[int]) -> list[float]:
    """Epoch size (in chunks of all weighted sources) at which each source would run dry."""
    wsum = sum(weights)
    return [a * wsum / w for a, w in zip(available, weights)]


def _planned_size(fits: Sequence[float], room: int | None) -> int:
    """Chunks of the weighted sources in an epoch: ``room`` (what ``total`` leaves them), else
    enough to read every weighted source to its end at least once."""
    return int(room) if room is not None else int(math.floor(max(fits) + 1e-9))


def _water_fill(weights: Sequence[float], caps: Sequence[int], total: int) -> list[int]:
    """``total`` items shared by weight, a source that has fewer than its share giving all it has
    and the others sharing the rest by their renormalised weights."""
    out = [0] * len(weights)
    live = list(range(len(weights)))
    left = int(total)
    while live:
        wsum = sum(weights[i] for i in live)
        full = [i for i in live if left * weights[i] / wsum >= caps[i]]
        if not full:
            part = _largest_remainder([weights[i] for i in live], left, [caps[i] for i in live])
            for i, c in zip(live, part):
                out[i] = c
            break
        for i in full:
            out[i] = int(caps[i])
            left -= int(caps[i])
            live.remove(i)
    return out


def _weighted_counts(weights: list[float], available: list[int], room: int | None, on_exhausted: str) -> list[int]:
    fits = _fits(weights, available)
    smallest = int(math.floor(min(fits) + 1e-9))  # the largest epoch in which no source runs dry
    if on_exhausted == "stop" or smallest >= _planned_size(fits, room):
        return _largest_remainder(weights, smallest, available)
    if on_exhausted == "restart":  # counts above what a source has: it is read again
        return _largest_remainder(weights, _planned_size(fits, room), [1 << 62 if a else 0 for a in available])
    target = sum(available) if room is None else min(int(room), sum(available))
    return _water_fill(weights, available, target)


def mixture_counts(
    available: Sequence[int],
    weights: Sequence[float | None],
    budgets: Sequence[int | None],
    total: int | None = None,
    on_exhausted: str = "stop",
) -> list[int]:
    """Chunks each source contributes to one epoch.

    Args:
        available: chunks each source has.
        weights: mixture weight per source, or None.
        budgets: chunk budget per source (``max_tokens // seq_len``), or None.
        total: optional cap on the total number of chunks (``max_train_tokens // seq_len``).
        on_exhausted: what a weighted source holding fewer chunks than its share does
            (:data:`EXHAUSTED_MODES`).

    Rules: a source with a budget contributes ``min(available, budget)``. A source with
    neither budget nor weight contributes everything it has. Sources with a weight share
    the rest in proportion to their weights. Their planned size is what ``total`` leaves
    them, or (without ``total``) enough to read each of them to its end at least once.
    When a source holds less than its share of that plan: ``stop`` shrinks the epoch to
    the largest one in which no chunk repeats (the scarcest source, relative to its
    weight, sets the size); ``restart`` keeps the plan, so a count may exceed what a
    source has (its chunks are repeated); ``renormalise`` takes all of a scarce source
    and shares the rest among the others by their weights (no chunk repeats). When no
    source runs short, the three agree. If ``total`` is exceeded, all counts are scaled
    down proportionally (largest remainder) to sum to ``total``.
    """
    n = len(available)
    if not (len(weights) == len(budgets) == n):
        raise ValueError("available, weights and budgets must have the same length")
    if on_exhausted not in EXHAUSTED_MODES:
        raise ValueError(f"on_exhausted must be one of {EXHAUSTED_MODES}, got {on_exhausted!r}")
    counts = [0] * n
    weighted = [i for i in range(n) if weights[i] is not None and budgets[i] is None]
    for i in range(n):
        if budgets[i] is not None:
            counts[i] = min(int(available[i]), int(budgets[i]))
        elif weights[i] is None:
            counts[i] = int(available[i])
    if weighted:
        room = None if total is None else max(0, int(total) - sum(counts))
        part = _weighted_counts([float(weights[i]) for i in weighted], [int(available[i]) for i in weighted],
                                room, on_exhausted)
        for i, c in zip(weighted, part):
            counts[i] = c
    if total is not None and sum(counts) > total:
        counts = _largest_remainder(counts, int(total), counts)
    return counts


def planned_weighted_chunks(
    available: Sequence[int],
    weights: Sequence[float | None],
    budgets: Sequence[int | None],
    total: int | None = None,
) -> list[float | None]:
    """Each weighted source's share of the planned epoch in chunks (see :func:`mixture_counts`),
    before any source runs dry; None for sources without a weight. A source with fewer
    ``available`` chunks than this runs dry."""
    n = len(available)
    weighted = [i for i in range(n) if weights[i] is not None and budgets[i] is None]
    out: list[float | None] = [None] * n
    if not weighted:
        return out
    fixed = sum(min(int(available[i]), int(budgets[i])) if budgets[i] is not None else int(available[i])
                for i in range(n) if i not in weighted)
    w = [float(weights[i]) for i in weighted]
    room = None if total is None else max(0, int(total) - fixed)
    size = _planned_size(_fits(w, [int(available[i]) for i in weighted]), room)
    for i, wi in zip(weighted, w):
        out[i] = size * wi / sum(w)
    return out


def renormalised_order(counts: Sequence[int], shares: Sequence[float], seed: int = 0) -> np.ndarray:
    """Source label of each position of an epoch in which source ``i`` gives exactly
    ``counts[i]`` items, mixed by ``shares``; when a source has given all its items, the
    others go on with their shares renormalised (:meth:`OnlineInterleaver.drop`)."""
    left = [int(c) for c in counts]
    mixer = OnlineInterleaver([float(x) if c > 0 else 0.0 for x, c in zip(shares, left)], seed=seed)
    out = np.empty(sum(left), dtype=np.int64)
    for t in range(len(out)):
        i = mixer.next()
        if i is None:
            raise ValueError("renormalised_order: a source with items left has no share")
        out[t] = i
        left[i] -= 1
        if left[i] == 0:
            mixer.drop(i)
    return out


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

    ``shares`` are normalised weights; ``exclude(i)`` removes a source, ``drop(i)`` removes
    it and renormalises the others.
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
        """Stop picking source ``i``; the others keep their shares of the whole stream."""
        if i in self.live:
            self.live.remove(i)

    def drop(self, i: int) -> None:
        """Stop picking source ``i`` and renormalise the others' shares: a new phase starts, in
        which every prefix holds the renormalised shares to within one item."""
        self.exclude(i)
        total = sum(self.shares[j] for j in self.live)
        self.shares = [self.shares[j] / total if j in self.live and total > 0 else 0.0 for j in range(len(self.shares))]
        self.taken = [0] * len(self.shares)
        self.t = 0


class Lookahead:
    """An iterator that knows, after each item, whether another one follows (``done``)."""

    _END = object()

    def __init__(self, items: Iterator) -> None:
        self._items = items
        self._next = next(items, self._END)

    @property
    def done(self) -> bool:
        return self._next is self._END

    def pop(self) -> Any:
        """The next item, or None at the end."""
        item = self._next
        if item is self._END:
            return None
        self._next = next(self._items, self._END)
        return item
