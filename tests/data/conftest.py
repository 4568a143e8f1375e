"""Fixtures for the data tests."""

from __future__ import annotations

import pytest

from lrc.teachers import tiny_tokenizer


@pytest.fixture(scope="session")
def tok():
    """Tiny byte-level tokenizer: token id == UTF-8 byte, eos 256, <|im_start|> 257, <|im_end|> 258."""
    return tiny_tokenizer()
