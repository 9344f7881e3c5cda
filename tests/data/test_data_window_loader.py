from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from tttexp.data import Tokenizer, WindowLoader

SEQ, BATCH = 32, 4


def _stream(tokens: list[np.ndarray], eos: int) -> np.ndarray:
    return np.concatenate([np.append(t.astype(np.int64), eos) for t in tokens])


def _window_index(batch: dict[str, torch.Tensor], stream: np.ndarray) -> list[int]:
    """Which window of the joined stream each row is; fails if a row is not one."""
    full = torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1).numpy()
    found = []
    for row in full:
        starts = np.flatnonzero(stream[: len(stream) - SEQ] == row[0])
        hits = [s for s in starts if s % (SEQ + 1) == 0 and np.array_equal(stream[s : s + SEQ + 1], row)]
        assert hits, "row is not a window of the joined documents"
        found.append(hits[0] // (SEQ + 1))
    return found


def test_batches_are_shifted_windows(small_tokens: list[np.ndarray], bpe: Tokenizer) -> None:
    loader = WindowLoader(small_tokens, bpe.eos_id, SEQ, BATCH, seed=0)
    batch = next(loader)
    assert set(batch) == {"input_ids", "labels"}
    for t in batch.values():
        assert t.shape == (BATCH, SEQ) and t.dtype == torch.int64
    assert torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:])
    assert loader.tokens_per_batch == BATCH * SEQ
    _window_index(batch, _stream(small_tokens, bpe.eos_id))


def test_two_ranks_share_no_window_and_cover_the_epoch(
    small_tokens: list[np.ndarray], bpe: Tokenizer
) -> None:
    docs = small_tokens[:3]  # a few hundred windows keep the content search quick
    stream = _stream(docs, bpe.eos_id)
    n_windows = len(stream) // (SEQ + 1)
    seen = []
    for rank in range(2):
        loader = WindowLoader(docs, bpe.eos_id, SEQ, BATCH, seed=5, rank=rank, world_size=2)
        assert loader.batches_per_epoch == n_windows // 2 // BATCH
        batches = itertools.islice(loader, loader.batches_per_epoch)
        seen.append([i for b in batches for i in _window_index(b, stream)])
        assert loader.epoch == 1
    assert len(seen[0]) == len(seen[1]) == len(set(seen[0])) == len(set(seen[1]))
    assert not set(seen[0]) & set(seen[1])
    assert len(seen[0]) * 2 > n_windows - 2 * BATCH  # only the partial last batch is dropped


def test_epochs_reshuffle(small_tokens: list[np.ndarray], bpe: Tokenizer) -> None:
    docs = small_tokens[:3]
    stream = _stream(docs, bpe.eos_id)
    loader = WindowLoader(docs, bpe.eos_id, SEQ, BATCH, seed=0)
    n = loader.batches_per_epoch
    epoch0 = [i for b in itertools.islice(loader, n) for i in _window_index(b, stream)]
    epoch1 = [i for b in itertools.islice(loader, n) for i in _window_index(b, stream)]
    assert epoch0 != epoch1
    assert len(set(epoch0)) == len(set(epoch1)) == n * BATCH
    n_windows = len(stream) // (SEQ + 1)
    assert len(set(epoch0) & set(epoch1)) >= 2 * n * BATCH - n_windows  # each epoch drops < BATCH windows


def test_resume_continues_with_the_same_batches(small_tokens: list[np.ndarray], bpe: Tokenizer) -> None:
    make = lambda: WindowLoader(small_tokens[:3], bpe.eos_id, SEQ, BATCH, seed=1, rank=1, world_size=2)
    loader = make()
    n = loader.batches_per_epoch
    for _ in range(n + 3):  # into the second epoch
        next(loader)
    state = loader.state_dict()
    assert state == {"epoch": 1, "position": 3}
    expected = list(itertools.islice(loader, n))
    resumed = make()
    resumed.load_state_dict(state)
    for a, b in zip(expected, itertools.islice(resumed, n), strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


def test_without_shuffle_each_epoch_reads_the_windows_in_corpus_order(small_tokens: list[np.ndarray],
                                                                      bpe: Tokenizer) -> None:
    stream = _stream(small_tokens, bpe.eos_id)
    windows = stream[: len(stream) // (SEQ + 1) * (SEQ + 1)].reshape(-1, SEQ + 1)
    ranks = [WindowLoader(small_tokens, bpe.eos_id, seq_len=SEQ, batch_size=BATCH, seed=3, rank=r, world_size=2,
                          shuffle=False) for r in range(2)]
    per_epoch = ranks[0].batches_per_epoch
    for rank, loader in enumerate(ranks):
        batches = itertools.islice(loader, 2 * per_epoch)
        rows = [torch.cat([b["input_ids"], b["labels"][:, -1:]], dim=1) for b in batches]
        first = list(range(rank, 2 * per_epoch * BATCH, 2))  # every rank its every other window
        assert np.array_equal(torch.cat(rows).numpy(), windows[first + first])  # and the next epoch the same again


def test_too_small_corpus_and_bad_arguments(small_tokens: list[np.ndarray], bpe: Tokenizer, one_line) -> None:
    with pytest.raises(ValueError) as excinfo:
        WindowLoader(small_tokens[:1], bpe.eos_id, seq_len=4096, batch_size=8, seed=0, world_size=2)
    assert "batch_size" in one_line(excinfo)
    with pytest.raises(ValueError) as excinfo:
        WindowLoader(small_tokens, bpe.eos_id, seq_len=0, batch_size=8, seed=0)
    assert "seq_len" in one_line(excinfo)
    with pytest.raises(ValueError) as excinfo:
        WindowLoader(small_tokens, bpe.eos_id, seq_len=8, batch_size=8, seed=0, rank=2, world_size=2)
    assert "rank" in one_line(excinfo)
    loader = WindowLoader(small_tokens, bpe.eos_id, seq_len=8, batch_size=8, seed=0)
    with pytest.raises(ValueError) as excinfo:
        loader.load_state_dict({"epoch": 0, "position": loader.batches_per_epoch})
    one_line(excinfo)
