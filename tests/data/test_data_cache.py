from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tttexp.data import Document, Tokenizer, tokenize_documents
from tttexp.data.cache import cache_key, token_dtype


def test_tokens_match_the_tokenizer(
    small_docs: list[Document], bpe: Tokenizer, small_tokens: list[np.ndarray]
) -> None:
    assert len(small_tokens) == len(small_docs)
    for doc, tokens in zip(small_docs[:5], small_tokens[:5], strict=True):
        assert tokens.dtype == np.uint16
        assert tokens.tolist() == bpe.encode(doc.text)


def test_second_call_loads_the_cache(
    tmp_path: Path, small_docs: list[Document], bpe: Tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    docs = small_docs[:6]
    with caplog.at_level(logging.INFO, logger="tttexp.data.cache"):
        first = tokenize_documents(docs, bpe, tmp_path)
        (entry,) = (tmp_path / "tokens").iterdir()
        stamp = (entry / "tokens.npy").stat().st_mtime_ns
        caplog.clear()
        second = tokenize_documents(docs, bpe, tmp_path)
    assert [r.getMessage().split()[0] for r in caplog.records] == ["loading"]
    assert (entry / "tokens.npy").stat().st_mtime_ns == stamp
    assert [t.tolist() for t in second] == [t.tolist() for t in first]
    assert sorted(p.name for p in entry.iterdir()) == ["meta.json", "offsets.npy", "tokens.npy"]


def test_key_changes_with_documents_and_tokenizer(small_docs: list[Document], bpe: Tokenizer) -> None:
    docs = small_docs[:3]
    edited = [docs[0], docs[1], Document(docs[2].id, docs[2].text + " Amen.")]
    renamed = [docs[0], docs[1], Document("other", docs[2].text)]
    keys = {cache_key(docs, bpe), cache_key(edited, bpe), cache_key(renamed, bpe), cache_key(docs[:2], bpe)}
    assert len(keys) == 4
    assert cache_key(list(docs), bpe) == cache_key(docs, bpe)


def test_token_dtype_follows_vocab_size() -> None:
    assert token_dtype(512) == np.uint16 and token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.int32 and token_dtype(151_000) == np.int32


_BUILD = """
import json, sys
from tttexp.data import build_tokenizer, load_documents, tokenize_documents
docs = load_documents("shipped")[::25]
tok = build_tokenizer("bpe", train_texts=[d.text for d in docs], vocab_size=400, cache_dir=sys.argv[1])
tokens = tokenize_documents(docs, tok, sys.argv[1])
print(json.dumps([tok.name, tok.encode(docs[0].text[:5000]), [t.tolist()[:50] for t in tokens]]))
"""


def test_concurrent_builders_share_one_entry(tmp_path: Path) -> None:
    """Like several ranks calling DataModule.setup() at once on an empty cache."""
    procs = [
        subprocess.Popen([sys.executable, "-c", _BUILD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(outputs)) == 1 and json.loads(outputs[0])[0].startswith("bpe-")
    assert len(list((tmp_path / "tokenizers").iterdir())) == 1
    assert len(list((tmp_path / "tokens").iterdir())) == 1  # no temporary leftovers either
