"""StreamLoader on real tokens: documents are the shipped-speech tokens cut to varied lengths, so rows
wrap around (start a new epoch) within a few dozen steps."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from tttexp.data import IGNORE_INDEX, StreamLoader, Tokenizer

K, SEQ, BATCH, WORLD = 8, 32, 3, 2
PAD = 1  # any token id; distinct from EOS here so the checks can tell them apart


@pytest.fixture(scope="module")
def docs(small_tokens: list[np.ndarray]) -> list[np.ndarray]:
    return [t[: 20 + 13 * i] for i, t in enumerate(small_tokens[:16])]  # lengths 20..215, all residues mod K


def _loader(docs: list[np.ndarray], eos: int, rank: int = 0, seq_len: int = SEQ) -> StreamLoader:
    return StreamLoader(docs, eos, PAD, seq_len, BATCH, K, seed=7, rank=rank, world_size=WORLD)


def _rows(loader: StreamLoader, steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's inputs, labels and document-start positions over `steps` consecutive batches."""
    batches = list(itertools.islice(loader, steps))
    for b in batches:
        assert b["input_ids"].shape == b["labels"].shape == (BATCH, loader.seq_len)
        assert b["doc_start"].shape == (BATCH, loader.seq_len // K) and b["doc_start"].dtype == torch.bool
        assert b["input_ids"].dtype == b["labels"].dtype == torch.int64
    inputs = torch.cat([b["input_ids"] for b in batches], dim=1).numpy()
    labels = torch.cat([b["labels"] for b in batches], dim=1).numpy()
    flags = torch.cat([b["doc_start"] for b in batches], dim=1).numpy()
    starts = np.zeros_like(inputs, dtype=bool)
    starts[:, ::K] = flags  # True at the first token of each flagged mini-batch
    return inputs, labels, starts


def _blocks(
    inputs: np.ndarray, labels: np.ndarray, starts: np.ndarray
) -> list[tuple[np.ndarray, np.ndarray]]:
    """A row's stream cut at the flagged document starts (the last, possibly partial, block dropped)."""
    cuts = np.flatnonzero(starts)
    assert cuts[0] == 0
    return [(inputs[a:b], labels[a:b]) for a, b in itertools.pairwise(cuts)]


def _check_block(block_in: np.ndarray, block_lab: np.ndarray, doc: np.ndarray, eos: int) -> None:
    n = len(doc)
    assert len(block_in) == -(-(n + 1) // K) * K  # document + EOS, padded to the next mini-batch boundary
    assert np.array_equal(block_in[:n], doc) and block_in[n] == eos and (block_in[n + 1 :] == PAD).all()
    assert np.array_equal(block_lab[: n - 1], doc[1:]) and block_lab[n - 1] == eos  # shifted within the doc
    assert (block_lab[n:] == IGNORE_INDEX).all()  # nothing predicted from the EOS or the padding


def test_rows_are_contiguous_padded_document_streams(docs: list[np.ndarray], bpe: Tokenizer) -> None:
    by_content = {tuple(d.tolist()): i for i, d in enumerate(docs)}
    first_pass: list[list[int]] = []
    for rank in range(WORLD):
        loader = _loader(docs, bpe.eos_id, rank)
        steps = 2 * loader.steps_per_epoch + 1  # every row reads its documents twice and starts a third pass
        inputs, labels, starts = _rows(loader, steps)
        for row in range(BATCH):
            order = []
            for block_in, block_lab in _blocks(inputs[row], labels[row], starts[row]):
                n = int(np.flatnonzero(block_in == bpe.eos_id)[0])
                doc = by_content[tuple(block_in[:n].tolist())]
                _check_block(block_in, block_lab, docs[doc], bpe.eos_id)
                order.append(doc)
            per_pass = next(i for i in range(1, len(order)) if order[i] in order[:i])
            assert sorted(order[per_pass : 2 * per_pass]) == sorted(order[:per_pass])  # same documents again
            first_pass.append(order[:per_pass])
    assert sorted(itertools.chain(*first_pass)) == list(range(len(docs)))  # each document in exactly one row


def test_no_label_crosses_a_document(docs: list[np.ndarray], bpe: Tokenizer) -> None:
    loader = _loader(docs, bpe.eos_id, rank=1)
    inputs, labels, starts = _rows(loader, loader.steps_per_epoch + 3)
    has_label = labels[:, :-1] != IGNORE_INDEX
    assert (labels[:, :-1][has_label] == inputs[:, 1:][has_label]).all()
    assert not (has_label & starts[:, 1:]).any()  # the token before a document start predicts nothing
    assert (labels[(inputs == PAD) | (inputs == bpe.eos_id)] == IGNORE_INDEX).all()


def test_streams_do_not_depend_on_seq_len(docs: list[np.ndarray], bpe: Tokenizer) -> None:
    short = _rows(_loader(docs, bpe.eos_id, rank=1, seq_len=SEQ), 12)
    long = _rows(_loader(docs, bpe.eos_id, rank=1, seq_len=4 * SEQ), 3)
    for a, b in zip(short, long, strict=True):
        assert np.array_equal(a, b)


def test_resume_continues_with_the_same_batches(docs: list[np.ndarray], bpe: Tokenizer) -> None:
    loader = _loader(docs, bpe.eos_id, rank=1)
    for _ in range(loader.steps_per_epoch + 2):
        next(loader)
    state = loader.state_dict()
    assert state == {"epoch": 1, "position": 2}
    expected = list(itertools.islice(loader, 2 * loader.steps_per_epoch))
    resumed = _loader(docs, bpe.eos_id, rank=1)
    resumed.load_state_dict(state)
    for a, b in zip(expected, itertools.islice(resumed, len(expected)), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "labels", "doc_start"))


def test_errors(docs: list[np.ndarray], bpe: Tokenizer, one_line) -> None:
    with pytest.raises(ValueError) as excinfo:
        StreamLoader(docs, bpe.eos_id, PAD, 36, BATCH, K, seed=0)
    assert "mini_batch_size" in one_line(excinfo)
    with pytest.raises(ValueError) as excinfo:
        StreamLoader(docs[:5], bpe.eos_id, PAD, SEQ, BATCH, K, seed=0, world_size=2)
    assert "batch_size" in one_line(excinfo)
    with pytest.raises(ValueError) as excinfo:
        StreamLoader(docs, bpe.eos_id, PAD, SEQ, BATCH, 0, seed=0)
    assert "mini_batch_size" in one_line(excinfo)
