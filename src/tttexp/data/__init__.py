"""Data: documents, tokenizers, the tokenized-corpus cache, training loaders and the config-facing DataModule.

Names are resolved on first use, so `import tttexp.data` stays cheap (no torch, numpy or tokenizer
libraries until they are needed).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tttexp.data.cache import tokenize_documents
    from tttexp.data.corpus import SOURCES, Document, load_documents, split_documents
    from tttexp.data.loaders import IGNORE_INDEX, StreamLoader, ValidationSet, WindowLoader
    from tttexp.data.module import DataModule, default_cache_dir
    from tttexp.data.tokenizer import Tokenizer, build_tokenizer

_WHERE = {
    "Document": "corpus",
    "SOURCES": "corpus",
    "load_documents": "corpus",
    "split_documents": "corpus",
    "Tokenizer": "tokenizer",
    "build_tokenizer": "tokenizer",
    "tokenize_documents": "cache",
    "IGNORE_INDEX": "loaders",
    "WindowLoader": "loaders",
    "StreamLoader": "loaders",
    "ValidationSet": "loaders",
    "DataModule": "module",
    "default_cache_dir": "module",
}

__all__ = [
    "IGNORE_INDEX",
    "SOURCES",
    "DataModule",
    "Document",
    "StreamLoader",
    "Tokenizer",
    "ValidationSet",
    "WindowLoader",
    "build_tokenizer",
    "default_cache_dir",
    "load_documents",
    "split_documents",
    "tokenize_documents",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
