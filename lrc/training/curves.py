"""``curves.csv``: every run's training and validation curves, whatever logger the config chose.

One row per logging call that carries ``train/*``, ``val/*`` or ``eval/*`` metrics (``eval/*``:
:class:`lrc.training.eval_callback.PeriodicEval`). The first three columns
are ``step`` (the step Lightning logs at), ``tokens_seen`` (training tokens so far) and ``wall_s``
(seconds of training so far, summed over resumes); the metric columns follow in sorted order.
A resumed run appends to the file, so rows that it repeats (steps after the last checkpoint of an
interrupted run) appear twice; :func:`lrc.analysis.curves.validation_points` keeps one validation
per token count. Reading the file needs no Lightning: see :mod:`lrc.analysis.curves`.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.utilities import rank_zero_only

from lrc.analysis.curves import CURVES_FILE, FIXED_COLUMNS, read_curves

__all__ = ["CURVES_FILE", "CurvesLogger"]
PREFIXES = ("train/", "val/", "eval/")


class CurvesLogger(Logger):
    """Writes ``path`` (normally ``<run>/curves.csv``).

    Args:
        path: the CSV file; an existing one (a resumed run) is appended to, and its last
            ``wall_s`` is where this run's clock starts.
        tokens: returns the training tokens seen so far (the module's counter).

    The clock runs from :meth:`start` (called just before training); rows logged before it, such as
    a validation before training, get the starting wall time.
    """

    def __init__(self, path: str | Path, tokens: Callable[[], int] = lambda: 0) -> None:
        super().__init__()
        self.path = Path(path)
        self._tokens = tokens
        self._t0: float | None = None
        rows = read_curves(self.path) if self.path.is_file() else []
        self._keys = _header(self.path) if self.path.is_file() else list(FIXED_COLUMNS)
        self._offset = max((r["wall_s"] for r in rows if r.get("wall_s") is not None), default=0.0)

    # Logger interface
    @property
    def name(self) -> str:
        return "curves"

    @property
    def version(self) -> str:
        return ""

    @property
    def save_dir(self) -> str:
        return str(self.path.parent)

    @property
    def log_dir(self) -> str:
        return str(self.path.parent)

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def start(self) -> None:
        """Start the wall clock (training begins)."""
        self._t0 = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds of training so far, including the runs this one resumes."""
        return self._offset + (time.perf_counter() - self._t0 if self._t0 is not None else 0.0)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        values = {k: float(v) for k, v in metrics.items() if k.startswith(PREFIXES)}
        if not values:
            return
        row = {"step": step, "tokens_seen": int(self._tokens()), "wall_s": round(self.elapsed(), 3), **values}
        new = sorted(set(values) - set(self._keys))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if new or not self.path.is_file():
            old = _raw_rows(self.path) if self.path.is_file() else []
            self._keys = [*FIXED_COLUMNS, *sorted(set(self._keys[len(FIXED_COLUMNS):]) | set(new))]
            _write(self.path, self._keys, old, mode="w", header=True)
        _write(self.path, self._keys, [row], mode="a", header=False)


def _raw_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _header(path: Path) -> list[str]:
    with path.open(newline="") as f:
        return next(csv.reader(f), None) or list(FIXED_COLUMNS)


def _write(path: Path, keys: list[str], rows: list[Mapping[str, Any]], mode: str, header: bool) -> None:
    with path.open(mode, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, restval="")
        if header:
            writer.writeheader()
        writer.writerows(rows)
