"""Helpers shared by the model, loss and export tests (tiny random teachers)."""

from __future__ import annotations

import torch

from lrc.model import CloneConfig, LowRankClone
from lrc.teachers import tiny_teacher

ARCHS = ("llama", "qwen2", "qwen3")


def randomize_trainable(clone: LowRankClone, seed: int = 0, std: float = 0.3) -> None:
    """Give projections and gains clearly non-default values, so tests catch misplaced tensors."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in clone.named_projections():
            p.copy_(torch.randn(p.shape, generator=g) * std)
        for _, p in clone.named_student_norms():
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))


def make_clone(arch: str = "llama", rank: int = 16, *, teacher_kwargs: dict | None = None, **config) -> LowRankClone:
    teacher = tiny_teacher(arch, **(teacher_kwargs or {}))
    return LowRankClone.from_teacher(teacher, CloneConfig(rank=rank, **config))


def random_ids(vocab: int, batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
