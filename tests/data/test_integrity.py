"""Batch fingerprints: a batch that reaches its step unchanged passes; one changed in any way the data path could
change it (a token, rows moved, labels of another batch) does not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tttexp.data import integrity
from tttexp.data.loaders import StreamLoader, WindowLoader


def _docs() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(1, 1000, size=int(n)).astype(np.uint16) for n in rng.integers(5, 60, size=80)]


@pytest.fixture
def batches() -> list[dict[str, torch.Tensor]]:
    loader = integrity.Fingerprinted(WindowLoader(_docs(), eos_id=0, seq_len=32, batch_size=4, seed=0))
    return [next(loader) for _ in range(2)]


def test_an_unchanged_batch_passes(batches):
    assert not bool(integrity.changed(batches[0]))
    assert int(batches[0][integrity.KEY][2]) == 0  # windows: every label is the next input


def test_stream_batches_with_document_ends_pass():
    loader = integrity.Fingerprinted(StreamLoader(_docs(), eos_id=0, pad_id=0, seq_len=32, batch_size=3,
                                                  mini_batch_size=16, seed=0))
    for _ in range(3):
        batch = next(loader)
        assert not bool(integrity.changed(batch))


def test_a_changed_token_is_caught(batches):
    batch = batches[0]
    batch["input_ids"][1, 5] += 1
    assert bool(integrity.changed(batch))


def test_moved_rows_are_caught(batches):
    batch = batches[0]
    batch["input_ids"], batch["labels"] = batch["input_ids"].flip(0), batch["labels"].flip(0)
    assert bool(integrity.changed(batch))


def test_labels_of_another_batch_are_caught(batches):
    batches[0]["labels"] = batches[1]["labels"]
    assert bool(integrity.changed(batches[0]))
