"""Training data of in-memory sources: packed chunks, the mixture's epoch order, its resume point.

* :class:`PackedChunks`: a map-style dataset over the chunks of several packed sources;
* :class:`MixtureSampler`: the deterministic, epoch-aware, resumable order over them;
* :class:`InMemoryMixture`: the two behind the :class:`~lrc.data.resume.TrainMixture` interface;
* :func:`report_dry_sources`: the log line for a weighted source holding less than its share.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from lrc.data.packing import PackedStream, interleave, seeded_rng
from lrc.data.resume import ResumableDataLoader, ResumablePosition, TrainMixture, check_whole_steps, no_batch_message

__all__ = ["InMemoryMixture", "MixtureSampler", "PackedChunks", "report_dry_sources"]

log = logging.getLogger(__name__)


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
    (all ranks get the same number). With ``drop_last`` the epoch holds whole optimizer steps of
    ``accumulate`` batches on every rank (:func:`~lrc.data.resume.check_whole_steps`), so every
    step is full and the epoch ends at the same sequence on any number of processes for the same
    global batch. Iteration yields sample indices of whole batches, starting at batch
    ``resume_batch`` when the epoch is ``resume_epoch``.
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
        self.accumulate = 1
        self.labels = interleave(self.counts, seed) if labels is None else np.asarray(labels, dtype=np.int64)
        if np.bincount(self.labels, minlength=len(self.counts)).tolist() != self.counts:
            raise ValueError("labels must hold counts[i] positions of every source i")
        self._init_position()
        self._cache: tuple[int, np.ndarray] | None = None

    def set_rank(self, rank: int, world_size: int, accumulate: int = 1) -> None:
        check_whole_steps(self.drop_last, int(world_size), int(accumulate))
        self.rank, self.world_size, self.num_replicas = int(rank), int(world_size), int(world_size)
        self.accumulate = int(accumulate)

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
        if self.drop_last:  # whole optimizer steps
            return n // (self.batch_size * self.world_size * self.accumulate) * self.accumulate
        return -(-n // self.batch_size) // self.world_size

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


class InMemoryMixture(TrainMixture):
    """A :class:`PackedChunks` dataset read in the order of its :class:`MixtureSampler`, which
    holds the position. Building it checks that it fills one batch on rank ``rank`` of
    ``world_size`` (so does every :meth:`set_rank`)."""

    def __init__(self, dataset: PackedChunks, sampler: MixtureSampler, seq_len: int) -> None:
        self.dataset = dataset
        self.sampler = sampler
        self.seq_len = seq_len
        self.check_first_batch()

    @property
    def position(self) -> MixtureSampler:
        return self.sampler

    def set_rank(self, rank: int, world_size: int, accumulate: int = 1) -> None:
        self.sampler.set_rank(rank, world_size, accumulate)
        self.check_first_batch()  # the mixture may have been built before the trainer was attached

    def check_first_batch(self) -> None:
        if self.sampler.batches_per_epoch() == 0:
            raise ValueError(no_batch_message(len(self.sampler.labels), self.seq_len, self.sampler.batch_size,
                                              self.sampler.world_size, self.sampler.accumulate))

    def dataloader(self, **kwargs: Any) -> ResumableDataLoader:
        return ResumableDataLoader(self.dataset, batch_size=self.sampler.batch_size, sampler=self.sampler,
                                   drop_last=self.sampler.drop_last, position_target=self.sampler, **kwargs)

    def first_sequences(self, n: int) -> list[np.ndarray]:
        """``input_ids`` of the first ``n`` sequences of epoch 0's order (whatever the position)."""
        return [self.dataset[int(i)]["input_ids"].numpy() for i in self.sampler.epoch_order(0)[:n]]


def report_dry_sources(names: Sequence[str], counts: Sequence[int], sizes: Sequence[int],
                       planned: Sequence[float | None], labels: np.ndarray, *, seq_len: int, batch_size: int,
                       on_exhausted: str) -> None:
    """Log every weighted source holding fewer sequences (``sizes``) than its ``planned`` share of
    the epoch, where in the epoch (``labels``) it runs dry and what happens then."""
    n, T, B = len(labels), seq_len, batch_size
    planned_total = sum(c if p is None else p for c, p in zip(counts, planned))
    for i, (name, have, plan) in enumerate(zip(names, sizes, planned)):
        if plan is None or have >= math.floor(plan + 1e-9):
            continue
        where = np.flatnonzero(labels == i)
        if on_exhausted == "stop":
            at, action = n, f"the epoch ends (planned: {planned_total:,.0f} sequences)"
        elif on_exhausted == "restart":
            at = int(where[have]) if 0 < have < len(where) else n
            action = f"it is read again from its start ({counts[i] / max(have, 1):.2f} passes per epoch)"
        else:
            at = int(where[-1]) + 1 if len(where) else 0
            action = "the other sources go on with their weights renormalised"
        log.warning(
            "data source %r runs dry: it holds %s tokens (%d sequences of %d) but its planned share is %s "
            "tokens; after %d sequences (%d batches) of each epoch %s (on_exhausted=%s)",
            name, f"{have * T:,}", have, T, f"{plan * T:,.0f}", at, at // B, action, on_exhausted,
        )
