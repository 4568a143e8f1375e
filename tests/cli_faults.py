"""Faults the CLI tests inject: a callback that poisons one optimizer update, one that kills the
process in the middle of a checkpoint write, and a pickle that runs code when it is loaded. Importable by name (``cli_faults.PoisonGradAt``) from a config, so the
real CLI runs them: the tests directory is on ``sys.path`` under pytest (and is put on
``PYTHONPATH`` for subprocesses)."""

from __future__ import annotations

import io
import os
import signal
from pathlib import Path

import lightning as L
import torch


class PoisonGradAt(L.Callback):
    """Set one gradient to NaN just before the optimizer update of step ``step``. The loss of that
    step is finite; clipping then spreads the NaN to every gradient and Adam writes NaN weights: the
    case of an update that breaks the weights without a warning from the loss."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if trainer.global_step == self.step:
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            grads[0].fill_(float("nan"))


class CreatesFileWhenUnpickled:
    """A pickle payload: loading it with ``weights_only=False`` creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def with_payload(ckpt: Path, out: Path, marker: Path) -> Path:
    """A copy of checkpoint ``ckpt`` at ``out`` carrying a :class:`CreatesFileWhenUnpickled`."""
    state = torch.load(ckpt, weights_only=True)
    state["payload"] = CreatesFileWhenUnpickled(marker)
    torch.save(state, out)
    return out


class KillDuringSave(L.Callback):
    """SIGKILL this process halfway through writing the first checkpoint of step ``step`` or later:
    half the bytes are on disk (flushed) when the process dies, as with a kill mid-write."""

    def __init__(self, step: int) -> None:
        self.step = step

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        real_save, step = torch.save, self.step

        def save(obj, f, *args, **kwargs):
            if isinstance(obj, dict) and obj.get("global_step", -1) >= step and hasattr(f, "write"):
                buf = io.BytesIO()
                real_save(obj, buf, *args, **kwargs)
                f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                f.flush()
                os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, f, *args, **kwargs)

        torch.save = save
