"""Rich progress bars for long one-off work (corpus harvest, tokenization), in one place."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable, Iterator


@contextmanager
def progress(description: str, total: int | None = None, unit: str = "items") -> Iterator[Callable[[int], None]]:
    """``with progress("tokenizing", unit="tokens") as advance: advance(n)``.

    Shows a bar when ``total`` is known, else a running count; ``LRC_NO_PROGRESS=1`` hides it.
    """
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = [SpinnerColumn(), TextColumn("{task.description}")]
    if total is not None:
        columns.append(BarColumn())
    columns += [TextColumn("{task.completed:,.0f} " + unit), TimeElapsedColumn()]
    with Progress(*columns, disable=bool(os.environ.get("LRC_NO_PROGRESS"))) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)
