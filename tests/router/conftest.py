"""A small real tokenizer (byte-level BPE with a chat template), built once per session."""

from __future__ import annotations

import pytest

from tests.e2e.tiny_model import build_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(str(path))
    return AutoTokenizer.from_pretrained(str(path))
