"""Save and restore the trainable tensors of a model by name (small checkpoints, no teacher)."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


def trainable_state(named: Iterable[tuple[str, nn.Parameter]]) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` (detached) of ``named``, e.g. a model's ``named_trainable()``."""
    return {name: p.detach() for name, p in named}


def load_trainable_state(named: Iterable[tuple[str, nn.Parameter]], state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into the parameters ``named``; the names and shapes must match exactly."""
    own = dict(named)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"trainable state mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, p in own.items():
            if p.shape != state[name].shape:
                raise ValueError(f"trainable state {name}: shape {tuple(state[name].shape)} != {tuple(p.shape)}")
            p.copy_(state[name])
