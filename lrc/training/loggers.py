"""Loggers that survive a resume."""

from __future__ import annotations

import csv
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` that keeps an existing ``metrics.csv`` and appends to it.

    Lightning's writer deletes the file it finds, which would erase a run's history when the run
    is resumed into the same directory (``ckpt_path=last``); this one restores it first.
    """

    @property
    def experiment(self):
        if self._experiment is not None:
            return self._experiment
        if rank_zero_only.rank > 0:  # only rank 0 writes (the parent gives the others a dummy); reading
            return super().experiment  # the file here would race with rank 0 replacing it
        path = Path(self.log_dir) / "metrics.csv"
        previous = path.read_text() if path.is_file() else None
        writer = super().experiment  # creates the writer, which removes the old file
        if previous:
            path.write_text(previous)
            with path.open(newline="") as f:
                writer.metrics_keys = list(csv.DictReader(f).fieldnames or [])
        return writer
