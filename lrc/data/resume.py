"""Exact mid-epoch resume, shared by every data module of :mod:`lrc.data`.

* :class:`ResumablePosition`: an epoch and a resume point (iteration of epoch ``e`` starts at
  batch ``n``);
* :class:`TrainMixture`: the one interface of training data, in memory
  (:class:`~lrc.data.in_memory.InMemoryMixture`) or streamed
  (:class:`~lrc.data.streaming.StreamingMixture`): its position, its rank, its data loader, its
  first sequences and a check that it fills one batch;
* :class:`ResumableDataLoader`: a ``DataLoader`` that counts the batches it hands out;
* :class:`ResumableDataModule`: the ``state_dict`` / ``load_state_dict`` of a data module over a
  :class:`TrainMixture` (``{"version": 2, "epoch", "sequences_consumed", "fingerprint", "seed"}``),
  which Lightning stores in checkpoints. The position is global: the sequences of epoch ``e`` that
  every process together has consumed. Each process's share of it (its batches to skip) is derived
  from the batch size and the number of processes of the run that loads it, so a checkpoint resumes
  exactly on 1 process or N for the same global batch; Lightning's own count of the epoch's batches
  is set to the same share (:meth:`ResumableDataModule._align_trainer_progress`). A version-1 state
  (``batches_consumed``: batches of one process) is read as batches of each process of the run that
  loads it: exact on the process count that wrote it, as before.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping

import numpy as np
from torch.utils.data import DataLoader

__all__ = [
    "ResumableDataLoader", "ResumableDataModule", "ResumablePosition", "TrainMixture", "check_whole_steps",
    "no_batch_message",
]

STATE_VERSION = 2


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
    process of a multi-device run and cuts every epoch into whole optimizer steps
    (:func:`check_whole_steps`); :meth:`dataloader` iterates it from :attr:`position`;
    :meth:`first_sequences` reads the first sequences of epoch 0 without touching the
    position; :meth:`check_first_batch` raises ``ValueError`` (:func:`no_batch_message`) when
    it cannot fill one batch on every rank.
    """

    @property
    def position(self) -> ResumablePosition:
        raise NotImplementedError

    def set_rank(self, rank: int, world_size: int, accumulate: int = 1) -> None:
        raise NotImplementedError

    def dataloader(self, **kwargs: Any) -> "ResumableDataLoader":
        raise NotImplementedError

    def first_sequences(self, n: int) -> list[np.ndarray]:
        raise NotImplementedError

    def check_first_batch(self) -> None:
        raise NotImplementedError


def check_whole_steps(drop_last: bool, world: int, accumulate: int) -> None:
    """An optimizer step's gradient is the token-weighted mean of its global batch only when each of
    its ``world x accumulate`` micro-batches holds the same number of tokens: Lightning divides every
    micro-batch's loss (a mean over its tokens) by ``accumulate`` and DDP / FSDP average over
    processes. Packed sequences all have ``seq_len`` tokens, so the mixtures cut each epoch into whole
    steps (``batch_size x world x accumulate`` sequences; the tail is dropped, as ``drop_last`` drops
    a partial batch). ``drop_last=False`` keeps a partial last batch, which would weigh as much as a
    full one: refused (``ValueError``) unless a step is one micro-batch on one process."""
    if not drop_last and world * accumulate > 1:
        raise ValueError(
            f"drop_last=false keeps a partial last batch, which would weigh as much as a full batch in an optimizer "
            f"step of {world * accumulate} micro-batches ({world} process(es) x {accumulate} accumulated); "
            f"set drop_last=true"
        )


def no_batch_message(sequences: int, seq_len: int, batch_size: int, world: int = 1, accumulate: int = 1) -> str:
    """What to change when the training data does not fill one optimizer step (one batch on every
    device, ``accumulate`` times)."""
    devices = f" x {world} devices" if world > 1 else ""
    devices += f" x {accumulate} accumulated" if accumulate > 1 else ""
    return (
        f"no full training batch: the data gives {sequences} training sequences of seq_len={seq_len} "
        f"per epoch, fewer than batch_size={batch_size}{devices}; lower "
        f"{'global_batch_size' if accumulate > 1 else 'batch_size'} or seq_len, or add data"
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
    training loader), ``self._resume`` (None), ``self.tokenizer`` and ``self.batch_size`` (sequences
    per batch of one process), and implements
    :meth:`_data_fingerprint` (a hash of everything that fixes the batch order).
    """

    mixture: TrainMixture | None
    _train_loader: ResumableDataLoader | None
    _resume: dict | None
    seed: int
    batch_size: int

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

    def _accumulation(self) -> int:
        """The attached trainer's ``accumulate_grad_batches`` (1 without one)."""
        return int(getattr(getattr(self, "trainer", None), "accumulate_grad_batches", 1) or 1)

    def _resumable_loader(self, **kwargs: Any) -> ResumableDataLoader:
        """The mixture's training loader on this process's rank, tied to this module's state; its
        epochs are whole optimizer steps of the attached trainer."""
        self.mixture.set_rank(*self._rank_world(), accumulate=self._accumulation())
        self._train_loader = self.mixture.dataloader(
            state_fn=self.state_dict, load_fn=self.load_state_dict, epoch_fn=self._trainer_epoch,
            persistent_workers=False, **kwargs,
        )
        return self._train_loader

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the next training iteration (manual loops; Lightning does this itself)."""
        self.mixture.position.set_epoch(epoch)

    def _position(self) -> tuple[int, int]:
        """``(epoch, batches of this process consumed in it)``."""
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
            return self._resume["epoch"], self._local_batches(self._resume)
        return 0, 0

    def _sequences_per_batch(self) -> int:
        """Sequences one batch of every process holds together: ``batch_size x world_size``."""
        return int(self.batch_size) * self._rank_world()[1]

    def _local_batches(self, resume: Mapping[str, Any]) -> int:
        """This process's batches to skip for a global position ``resume``; ``ValueError`` when it is
        not a whole number of batches of every process (a position of a run with another global batch)."""
        if resume.get("batches") is not None:  # a version-1 state: already this process's batches
            return int(resume["batches"])
        seqs, per = int(resume["sequences"]), self._sequences_per_batch()
        if seqs % per:
            raise ValueError(
                f"cannot resume {type(self).__name__}: the checkpoint stopped {seqs} sequences into epoch "
                f"{resume['epoch']}, which is not a whole number of batches of batch_size={self.batch_size} on "
                f"{per // int(self.batch_size)} process(es) ({per} sequences); resume with the global batch "
                f"(batch size x processes x accumulation) of the run that wrote it"
            )
        return seqs // per

    def state_dict(self) -> dict[str, Any]:
        """``{"version", "epoch", "sequences_consumed", "fingerprint", "seed"}`` of the training stream;
        ``sequences_consumed`` counts the epoch's sequences of every process together."""
        epoch, batches = self._position()
        return {
            "version": STATE_VERSION,
            "epoch": epoch,
            "sequences_consumed": batches * self._sequences_per_batch(),
            "fingerprint": self._data_fingerprint(),
            "seed": self.seed,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Resume: the next iteration of epoch ``epoch`` starts after ``sequences_consumed`` sequences of
        every process together (this process skips its share of them). A version-1 state's
        ``batches_consumed`` is taken as this process's batches."""
        if not state_dict:
            return
        version = int(state_dict.get("version", 0))
        if version not in (1, STATE_VERSION):
            raise ValueError(f"unsupported {type(self).__name__} state version {state_dict.get('version')!r}")
        self._resume = {
            "epoch": int(state_dict["epoch"]),
            "sequences": int(state_dict["sequences_consumed"]) if version == STATE_VERSION else None,
            "batches": int(state_dict["batches_consumed"]) if version == 1 else None,
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
        epoch, batches = self._resume["epoch"], self._local_batches(self._resume)
        position = self.mixture.position
        position.set_epoch(epoch)
        position.set_resume(epoch, batches)
        if self._train_loader is not None:
            self._train_loader.position = (epoch, batches)
        self._align_trainer_progress(batches)

    def _align_trainer_progress(self, batches: int) -> None:
        """Set Lightning's count of the epoch's batches, restored from a checkpoint, to this process's
        ``batches``. They differ when the checkpoint was written on another number of processes; the
        count decides where accumulation steps and the epoch end. Every counter moves by the same
        amount, so Lightning still sees where in a batch the checkpoint was written. Lightning loads
        the data position (through the train loader's ``load_state_dict``) after its loops, so this
        runs after them; before (``restore_datamodule``) the loops are not restarting and nothing moves."""
        trainer = getattr(self, "trainer", None)
        fit_loop = getattr(trainer, "fit_loop", None)
        if fit_loop is None or not fit_loop.restarting:
            return
        progress = fit_loop.epoch_loop.batch_progress
        shift = batches - progress.current.ready
        if shift:
            for tracker in (progress.current, progress.total):
                for field in ("ready", "started", "processed", "completed"):
                    setattr(tracker, field, getattr(tracker, field) + shift)
