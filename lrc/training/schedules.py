"""Learning-rate schedules as pure functions of the step: multiplier in [0, 1] of the peak lr."""

from __future__ import annotations

import math
from typing import Callable

SCHEDULES = ("linear", "cosine", "wsd", "constant")


def warmup_steps_for(total_steps: int, warmup_ratio: float) -> int:
    """Number of warm-up steps: ``ceil(ratio * total)`` (paper: 0.5% of the steps)."""
    return math.ceil(warmup_ratio * total_steps) if warmup_ratio > 0 else 0


def lr_multiplier(
    step: int,
    total_steps: int,
    warmup_steps: int,
    kind: str = "linear",
    *,
    min_ratio: float = 0.0,
    decay_ratio: float = 0.2,
) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based).

    Warm-up: linear from 1/(warmup+1) to 1 over ``warmup_steps``.  Then
    - "linear": linear decay to ``min_ratio`` at ``total_steps`` (paper);
    - "cosine": half-cosine decay to ``min_ratio``;
    - "wsd": warmup-stable-decay, constant then linear decay over the last ``decay_ratio`` of steps;
    - "constant": stays at 1.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; expected one of {SCHEDULES}")
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return 1.0
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    if kind == "linear":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    if kind == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_start = 1.0 - decay_ratio
    if progress < decay_start:
        return 1.0
    return min_ratio + (1 - min_ratio) * (1 - (progress - decay_start) / max(decay_ratio, 1e-12))


def schedule_fn(total_steps: int, warmup_ratio: float, kind: str, **kwargs) -> Callable[[int], float]:
    warmup = warmup_steps_for(total_steps, warmup_ratio)
    return lambda step: lr_multiplier(step, total_steps, warmup, kind, **kwargs)
