"""Unit-test fixtures shared by several modules."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from asympo.model.char_tokenizer import save_char_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> object:
    """The tiny model's character tokenizer (256 positions), loaded by AutoTokenizer."""
    d = tmp_path_factory.mktemp("tok")
    save_char_tokenizer(d, 256)
    return AutoTokenizer.from_pretrained(d)
