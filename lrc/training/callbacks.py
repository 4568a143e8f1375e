"""Callbacks: save-and-stop on SIGINT/SIGTERM, and a final run summary."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import lightning as L


class GracefulShutdown(L.Callback):
    """On SIGINT or SIGTERM, finish the current step, write ``<dirpath>/last.ckpt`` and stop.
    Also writes it after the final step, so a finished run always ends with a checkpoint.

    The checkpoint holds the optimizer, scheduler, data position and trainable weights, so
    ``ckpt_path=last`` continues exactly where the run stopped.  It is written from
    ``on_train_batch_end``, the same point as Lightning's own periodic checkpoints, which is
    what Lightning's resume logic expects.
    """

    def __init__(self, dirpath: str | Path, filename: str = "last.ckpt") -> None:
        self.path = Path(dirpath) / filename
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:  # noqa: ARG002
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl+C stops at once
        self.received = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handler)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        final = trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step
        if self.received is None and not (final and not trainer.fast_dev_run):
            return
        trainer.save_checkpoint(self.path)
        if self.received is not None:
            trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def interrupted(self) -> bool:
        return self.received is not None
