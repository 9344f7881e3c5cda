from __future__ import annotations

import numpy as np
import pytest
import torch

from tttexp.data import Tokenizer, ValidationSet

SEQ = 64


def test_windows_are_fixed_and_spread_over_the_split(small_tokens: list[np.ndarray], bpe: Tokenizer) -> None:
    docs = small_tokens[:4]
    stream = np.concatenate([np.append(t.astype(np.int64), bpe.eos_id) for t in docs])
    n_windows = len(stream) // (SEQ + 1)
    val = ValidationSet(docs, bpe.eos_id, SEQ, max_windows=10)
    assert len(val) == 10 and val.num_tokens == 10 * SEQ
    batches = list(val.batches(4))
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]
    inputs = torch.cat([b["input_ids"] for b in batches]).numpy()
    labels = torch.cat([b["labels"] for b in batches]).numpy()
    assert np.array_equal(labels[:, :-1], inputs[:, 1:])
    windows = stream[: n_windows * (SEQ + 1)].reshape(n_windows, SEQ + 1)
    picked = [int(np.flatnonzero((windows[:, :SEQ] == row).all(axis=1))[0]) for row in inputs]
    assert picked == sorted(picked) and picked[0] == 0 and picked[-1] == n_windows - 1
    again = ValidationSet(docs, bpe.eos_id, SEQ, max_windows=10)
    assert all(
        torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(again.batches(4), batches, strict=True)
    )
    assert len(ValidationSet(docs[:1], bpe.eos_id, SEQ, max_windows=10**6)) == (len(docs[0]) + 1) // (SEQ + 1)


def test_long_sequences_start_the_longest_documents(small_tokens: list[np.ndarray], bpe: Tokenizer) -> None:
    docs = small_tokens[:6]
    val = ValidationSet(docs, bpe.eos_id, SEQ, max_windows=8)
    seqs = val.long_sequences(1000, max_sequences=3)
    assert seqs.shape == (3, 1001) and seqs.dtype == torch.int64
    longest = sorted(docs, key=len, reverse=True)[:3]
    for row, doc in zip(seqs.numpy(), longest, strict=True):
        assert np.array_equal(row, doc[:1001])
    shortest = min(len(d) for d in docs)
    exact = val.long_sequences(shortest, max_sequences=100)  # a document plus its EOS fits exactly
    assert exact.shape == (6, shortest + 1) and bpe.eos_id in exact[:, -1].tolist()


def test_errors(small_tokens: list[np.ndarray], bpe: Tokenizer, one_line) -> None:
    with pytest.raises(ValueError) as excinfo:
        ValidationSet([small_tokens[0][:10]], bpe.eos_id, SEQ, max_windows=4)
    assert "seq_len" in one_line(excinfo)
    val = ValidationSet(small_tokens[:2], bpe.eos_id, SEQ, max_windows=4)
    with pytest.raises(ValueError) as excinfo:
        val.long_sequences(10**7, max_sequences=2)
    assert "lower length" in one_line(excinfo)
