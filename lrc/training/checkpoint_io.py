"""Reading and writing lrc-distill checkpoints: crash-safe writes, safe reads, clear errors.

:class:`AtomicCheckpointIO` is the Lightning ``CheckpointIO`` every lrc-distill Trainer uses, so
Lightning's own saves (``ModelCheckpoint``, the shutdown callback) and its resume path
(``trainer.fit(ckpt_path=...)``) go through :func:`save_checkpoint` and :func:`load_checkpoint`.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from lrc.io import atomic_write, stale_temps


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, empty, truncated, corrupt, unsafe or not lrc's."""


def save_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` to a file beside ``path``, flushed to disk, then renamed onto ``path``: a crash,
    a kill or a full disk leaves the previous checkpoint complete (see :func:`lrc.io.atomic_write`)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as fh:
            torch.save(checkpoint, fh)
    except OSError as err:  # a full disk, a lost mount: the user's to fix, so one line, not a traceback
        raise CheckpointError(
            f"could not write checkpoint {path}: {err.strerror or err}; the previous one is intact"
        ) from None
    for leftover in stale_temps(path):  # of writes killed earlier; the run directory is locked
        leftover.unlink(missing_ok=True)


def load_checkpoint(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint written by lrc-distill with ``weights_only=True``: tensors and plain values
    only, so a crafted file cannot run code. Raises :class:`CheckpointError` with one clear line for
    a missing, empty, truncated, corrupt or foreign file."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): the write that made it never finished")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"checkpoint {path} ({size:,} bytes) is not a readable PyTorch checkpoint: it is truncated, "
            f"corrupt or another kind of file"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - any failure here is a bad file, reported in one line
        text = str(err)
        unsafe = re.search(r"GLOBAL (\S+) was not an allowed global", text)
        if unsafe or "Unsupported global" in text:
            raise CheckpointError(
                f"checkpoint {path} holds objects other than tensors and plain values"
                + (f" ({unsafe.group(1)})" if unsafe else "")
                + ", so lrc-distill did not write it; it is not loaded, because loading such a file can run code"
            ) from None
        detail = text.split("WeightsUnpickler error:")[-1] if "WeightsUnpickler error:" in text else text
        lines = [line.strip() for line in detail.splitlines() if line.strip()]
        raise CheckpointError(f"checkpoint {path} ({size:,} bytes) is corrupt: {lines[0] if lines else type(err).__name__}") from None
    if not isinstance(state, dict) or "lrc" not in state or "state_dict" not in state:
        raise CheckpointError(f"{path} is a PyTorch file but not an lrc-distill checkpoint")
    return state


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` with crash-safe writes and ``weights_only`` reads.

    Lightning's own writer stages the file in ``$TMPDIR`` and moves it into place, which is a copy,
    not an atomic rename, when ``$TMPDIR`` is on another filesystem (a tmpfs ``/tmp``, an NFS home):
    a kill mid-copy leaves a 0-byte or partial ``last.ckpt`` and the previous one is gone.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        save_checkpoint(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint(path, map_location=map_location if map_location is not None else "cpu")
