"""Training data of streaming sources: read, tokenized, packed and mixed on the fly.

:class:`StreamingMixture` is an ``IterableDataset`` of whole batches behind the
:class:`~lrc.data.resume.TrainMixture` interface; its held-out head is read by the data module
(:mod:`lrc.data.datamodule`), which tells it how many documents of each source to skip.
"""

from __future__ import annotations

import itertools
import logging
import os
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from lrc.data.packing import EXHAUSTED_MODES, Lookahead, OnlineInterleaver, StreamPacker, seeded_rng, tokenize_documents
from lrc.data.resume import ResumableDataLoader, ResumablePosition, TrainMixture, check_whole_steps, no_batch_message
from lrc.data.sources import SourceConfig, iter_documents

__all__ = ["StreamingMixture"]

log = logging.getLogger(__name__)


class StreamingMixture(ResumablePosition, TrainMixture, IterableDataset):
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
    again) before mixing. Rank ``r`` of ``world_size`` takes global batches ``r, r + world_size,
    ...``; with ``drop_last`` only whole optimizer steps (``world_size x accumulate`` batches, read
    ahead before any is handed out) so every rank gets the same number of batches and every step
    is full (:func:`~lrc.data.resume.check_whole_steps`). This rank's batch ``b`` goes to dataloader
    worker ``b % W``, so the batch order does not depend on the number of workers (each worker reads
    the full stream). Resuming replays the stream and skips ``resume_batch`` batches.
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
        self.accumulate = 1
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

    # -- the TrainMixture interface

    @property
    def position(self) -> "StreamingMixture":
        return self

    def set_rank(self, rank: int, world_size: int, accumulate: int = 1) -> None:
        check_whole_steps(self.drop_last, int(world_size), int(accumulate))
        self.rank, self.world_size, self.accumulate = int(rank), int(world_size), int(accumulate)

    def check_first_batch(self) -> None:
        """Read the head of the stream: it must fill one optimizer step (one batch on every rank,
        ``accumulate`` times)."""
        need = self.batch_size * self.world_size * self.accumulate
        got = self.first_chunks(need)
        if got < need:
            raise ValueError(no_batch_message(got, self.seq_len, self.batch_size, self.world_size, self.accumulate))

    def dataloader(self, **kwargs: Any) -> ResumableDataLoader:
        return ResumableDataLoader(self, batch_size=None, position_target=self, **kwargs)

    def first_sequences(self, n: int) -> list[np.ndarray]:
        """Tokens of the first ``n`` sequences of epoch 0, before the shuffle buffer (the position
        is kept)."""
        epoch = self.epoch
        try:
            self.set_epoch(0)
            return [tokens for _, tokens, _ in itertools.islice(self.iter_chunks(buffered=False), n)]
        finally:
            self.set_epoch(epoch)

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
        for batch in self._rank_batches(report=worker == 0 and self.rank == 0):
            if local >= start and (local - start) % n_workers == worker:
                yield self._collate(batch)
            local += 1

    def _rank_batches(self, report: bool = False) -> Iterator[list]:
        """This rank's batches of the epoch, in whole optimizer steps when ``drop_last``."""
        step = self.world_size * self.accumulate if self.drop_last else self.world_size
        pending: list = []  # this rank's batches of the step being read
        for b, batch in enumerate(self._batches(report=report)):
            if b % self.world_size == self.rank:
                pending.append(batch)
            if (b + 1) % step == 0:
                yield from pending
                pending = []
        if not self.drop_last:
            yield from pending
