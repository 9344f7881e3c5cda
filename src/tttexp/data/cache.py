"""Tokenized-corpus cache: each (tokenizer, document set) is tokenized once and stored as two .npy files.

Layout: `cache_dir/tokens/<key>/tokens.npy` (all documents' ids back to back) and `offsets.npy`
(int64, document i is tokens[offsets[i]:offsets[i + 1]]). The key covers the tokenizer's name and every
document's id and text, so a changed document or tokenizer gets a new entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tttexp.data._atomic import publish_dir, temporary_sibling
from tttexp.data.corpus import Document
from tttexp.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

_CHUNK_CHARS = 4_000_000  # texts handed to the tokenizer at once; bounds the memory of one encode call


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.int32)


def tokenize_documents(
    docs: Sequence[Document], tokenizer: Tokenizer, cache_dir: Path | str
) -> list[np.ndarray]:
    """Token ids of each document (read-only arrays), from the cache when present."""
    entry = Path(cache_dir).expanduser() / "tokens" / cache_key(docs, tokenizer)
    if (entry / "offsets.npy").is_file():
        log.info("loading %d tokenized documents from %s", len(docs), entry)
    else:
        log.info("tokenizing %d documents with %s -> %s", len(docs), tokenizer.name, entry)
        _write_entry(entry, docs, tokenizer)
    tokens = np.load(entry / "tokens.npy", mmap_mode="r")
    offsets = np.load(entry / "offsets.npy")
    return [tokens[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]


def cache_key(docs: Sequence[Document], tokenizer: Tokenizer) -> str:
    h = hashlib.sha256(f"{tokenizer.name}\x00{len(docs)}".encode())
    for doc in docs:
        data = doc.text.encode("utf-8", errors="surrogatepass")
        h.update(f"\x00{doc.id}\x00{len(data)}\x00".encode())
        h.update(data)
    return h.hexdigest()[:20]


def _write_entry(entry: Path, docs: Sequence[Document], tokenizer: Tokenizer) -> None:
    dtype = token_dtype(tokenizer.vocab_size)
    pieces = [np.asarray(ids, dtype=np.int64) for ids in _encode_all(docs, tokenizer)]
    lengths = np.array([len(p) for p in pieces], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= tokenizer.vocab_size):
        raise ValueError(
            f"tokenizer {tokenizer.name} produced ids outside [0, {tokenizer.vocab_size}); check it"
        )

    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(entry)
    tmp.mkdir()
    np.save(tmp / "tokens.npy", tokens.astype(dtype))
    np.save(tmp / "offsets.npy", offsets)
    meta = {
        "tokenizer": tokenizer.name,
        "documents": len(docs),
        "tokens": int(offsets[-1]),
        "dtype": dtype.name,
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    publish_dir(tmp, entry)


def _encode_all(docs: Sequence[Document], tokenizer: Tokenizer) -> list[list[int]]:
    out: list[list[int]] = []
    chunk: list[str] = []
    size = 0
    for doc in docs:
        chunk.append(doc.text)
        size += len(doc.text)
        if size >= _CHUNK_CHARS:
            out += tokenizer.encode_batch(chunk)
            chunk, size = [], 0
    if chunk:
        out += tokenizer.encode_batch(chunk)
    return out
