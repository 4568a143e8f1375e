"""Exact mid-epoch resume, shared by every data module of :mod:`lrc.data`.

* :class:`ResumablePosition`: an epoch and a resume point (iteration of epoch ``e`` starts at
  batch ``n``);
* :class:`TrainMixture`: the one interface of training data, in memory
  (:class:`~lrc.data.in_memory.InMemoryMixture`) or streamed
  (:class:`~lrc.data.streaming.StreamingMixture`): its position, its rank, its data loader, its
  first sequences and a check that it fills one batch;
* :class:`ResumableDataLoader`: a ``DataLoader`` that counts the batches it hands out;
* :class:`ResumableDataModule`: the ``state_dict`` / ``load_state_dict`` of a data module over a
  :class:`TrainMixture` (``{"version": 1, "epoch", "batches_consumed", "fingerprint", "seed"}``),
  which Lightning stores in checkpoints. After ``load_state_dict`` the first iteration of epoch
  ``e`` skips exactly ``n`` batches, so a resumed run sees the same remaining batches as an
  uninterrupted one.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping

import numpy as np
from torch.utils.data import DataLoader

__all__ = ["ResumableDataLoader", "ResumableDataModule", "ResumablePosition", "TrainMixture", "no_batch_message"]

STATE_VERSION = 1


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
        """The batch the next iteration of the current epoch starts at."""
        return self.resume_batch if self.resume_epoch == self.epoch else 0


class TrainMixture:
    """The training data of a data module, whatever its kind: what the module asks of it.

    :attr:`position` holds the epoch and resume point; :meth:`set_rank` shards it for a
    process of a multi-device run; :meth:`dataloader` iterates it from :attr:`position`;
    :meth:`first_sequences` reads the first sequences of epoch 0 without touching the
    position; :meth:`check_first_batch` raises ``ValueError`` (:func:`no_batch_message`) when
    it cannot fill one batch on every rank.
    """

    @property
    def position(self) -> ResumablePosition:
        raise NotImplementedError

    def set_rank(self, rank: int, world_size: int) -> None:
        raise NotImplementedError

    def dataloader(self, **kwargs: Any) -> "ResumableDataLoader":
        raise NotImplementedError

    def first_sequences(self, n: int) -> list[np.ndarray]:
        raise NotImplementedError

    def check_first_batch(self) -> None:
        raise NotImplementedError


def no_batch_message(sequences: int, seq_len: int, batch_size: int, world: int = 1) -> str:
    """What to change when the training data does not fill one batch on every device."""
    devices = f" x {world} devices" if world > 1 else ""
    return (
        f"no full training batch: the data gives {sequences} training sequences of seq_len={seq_len} "
        f"per epoch, fewer than batch_size={batch_size}{devices}; lower batch_size or seq_len, or add data"
    )


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
        self._target = position_target  # the mixture's ResumablePosition
        self._state_fn = state_fn
        self._load_fn = load_fn
        self._epoch_fn = epoch_fn
        self.position = (0, 0)

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


class ResumableDataModule:
    """Resume state of a ``LightningDataModule`` whose training data is a :class:`TrainMixture`
    (mixed in before ``LightningDataModule``).

    The subclass sets ``self.mixture`` (None until set up), ``self._train_loader`` (the last
    training loader), ``self._resume`` (None) and ``self.tokenizer``, and implements
    :meth:`_data_fingerprint` (a hash of everything that fixes the batch order).
    """

    mixture: TrainMixture | None
    _train_loader: ResumableDataLoader | None
    _resume: dict | None
    seed: int

    def _data_fingerprint(self) -> str:
        raise NotImplementedError

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        return 0, 1

    def _trainer_epoch(self) -> int | None:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return None
        try:
            return int(trainer.fit_loop.epoch_progress.current.processed)
        except AttributeError:
            return None

    def _resumable_loader(self, **kwargs: Any) -> ResumableDataLoader:
        """The mixture's training loader on this process's rank, tied to this module's state."""
        self.mixture.set_rank(*self._rank_world())
        self._train_loader = self.mixture.dataloader(
            state_fn=self.state_dict, load_fn=self.load_state_dict, epoch_fn=self._trainer_epoch,
            persistent_workers=False, **kwargs,
        )
        return self._train_loader

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the next training iteration (manual loops; Lightning does this itself)."""
        self.mixture.position.set_epoch(epoch)

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
            "fingerprint": self._data_fingerprint(),
            "seed": self.seed,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Resume: the next iteration of epoch ``epoch`` starts after ``batches_consumed`` batches."""
        if not state_dict:
            return
        if int(state_dict.get("version", 0)) != STATE_VERSION:
            raise ValueError(f"unsupported {type(self).__name__} state version {state_dict.get('version')!r}")
        self._resume = {
            "epoch": int(state_dict["epoch"]),
            "batches_consumed": int(state_dict["batches_consumed"]),
            "fingerprint": state_dict.get("fingerprint"),
        }
        self._apply_resume()

    def _apply_resume(self) -> None:
        if self._resume is None or self.mixture is None:
            return  # applied in setup()
        fp = self._resume.get("fingerprint")
        if fp is not None and self.tokenizer is not None and fp != self._data_fingerprint():
            warnings.warn(
                f"resuming {type(self).__name__} with a different data configuration than the checkpoint's; "
                "the position is kept but the batches will differ from the original run", stacklevel=2)
        position = self.mixture.position
        position.set_epoch(self._resume["epoch"])
        position.set_resume(self._resume["epoch"], self._resume["batches_consumed"])
        if self._train_loader is not None:
            self._train_loader.position = (self._resume["epoch"], self._resume["batches_consumed"])
