"""Shared real-text fixtures: a subset of the shipped speeches, a small BPE trained on it, its tokens."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tttexp.data import Document, Tokenizer, build_tokenizer, load_documents, tokenize_documents

VOCAB = 512


@pytest.fixture(scope="session")
def shipped_docs() -> list[Document]:
    return load_documents("shipped")


@pytest.fixture(scope="session")
def small_docs(shipped_docs: list[Document]) -> list[Document]:
    """Every tenth speech: about 25 documents from 1790 to today."""
    return shipped_docs[::10]


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def bpe(small_docs: list[Document], session_cache: Path) -> Tokenizer:
    return build_tokenizer(
        "bpe", train_texts=[d.text for d in small_docs], vocab_size=VOCAB, cache_dir=session_cache
    )


@pytest.fixture(scope="session")
def small_tokens(small_docs: list[Document], bpe: Tokenizer, session_cache: Path) -> list[np.ndarray]:
    return tokenize_documents(small_docs, bpe, session_cache)


@pytest.fixture
def one_line() -> Callable[[pytest.ExceptionInfo[BaseException]], str]:
    """Returns a checker that an error message is a single non-empty line (and returns the message)."""

    def check(excinfo: pytest.ExceptionInfo[BaseException]) -> str:
        message = str(excinfo.value)
        assert message and "\n" not in message, message
        return message

    return check
