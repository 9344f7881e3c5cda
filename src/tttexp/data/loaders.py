"""Training batches and validation windows from tokenized documents.

Every batch is a dict of torch tensors: `input_ids` and `labels`, int64 [B, T], where labels[:, i] is the
token that follows input_ids[:, i] and -100 marks positions without a loss. Loaders are infinite iterators
whose position is a pair of plain ints (`state_dict`), so a resumed run sees exactly the batches an
uninterrupted one would have seen.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np
import torch

IGNORE_INDEX = -100

Batch = dict[str, torch.Tensor]


class TokenStream(Protocol):
    """Documents already joined with their EOS tokens, read by position (e.g. a prepared corpus's shards)."""

    def __len__(self) -> int: ...

    def read(self, start: int, n: int) -> np.ndarray: ...


class WindowLoader:
    """Shuffled, non-overlapping windows of the concatenated corpus, sharded across ranks.

    The documents are joined into one stream with an EOS after each document and cut into windows of
    seq_len + 1 tokens (a window's inputs are its first seq_len tokens, its labels the last seq_len).
    Epoch e visits the windows in a permutation seeded by (seed, e) (with ``shuffle=False``: in corpus order,
    every epoch alike); rank r takes every world_size-th window of it, every rank the same number, and a partial
    last batch is dropped. Given a :class:`TokenStream`
    instead of documents, only the windows this rank trains on are ever read.
    """

    def __init__(
        self,
        docs_tokens: Sequence[np.ndarray] | TokenStream,
        eos_id: int,
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        _check_positive(seq_len=seq_len, batch_size=batch_size, world_size=world_size)
        _check_rank(rank, world_size)
        self.seq_len, self.batch_size = seq_len, batch_size
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        if hasattr(docs_tokens, "read"):
            self._stream: TokenStream | None = docs_tokens  # type: ignore[assignment]
            self._windows = None
            self._n_windows = len(docs_tokens) // (seq_len + 1)
        else:
            self._stream = None
            self._windows = _windows(_joined(docs_tokens, eos_id), seq_len)  # type: ignore[arg-type]
            self._n_windows = len(self._windows)
        per_rank = self._n_windows // world_size
        if per_rank < batch_size:
            raise ValueError(
                f"the training split gives {self._n_windows} windows of {seq_len + 1} tokens, fewer "
                f"than batch_size x world_size = {batch_size * world_size}; lower seq_len or batch_size"
            )
        self.batches_per_epoch = per_rank // batch_size
        self._epoch, self._position = 0, 0
        self._order: tuple[int, np.ndarray] | None = None

    @property
    def tokens_per_batch(self) -> int:
        """Tokens with a loss in one batch of this rank."""
        return self.batch_size * self.seq_len

    @property
    def epoch(self) -> int:
        return self._epoch

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        order = self._rank_order(self._epoch)
        chosen = order[self._position * self.batch_size : (self._position + 1) * self.batch_size]
        if self._windows is not None:
            rows = self._windows[chosen]
        else:
            assert self._stream is not None
            width = self.seq_len + 1
            rows = np.stack([self._stream.read(int(w) * width, width) for w in chosen])
        self._position += 1
        if self._position == self.batches_per_epoch:
            self._epoch, self._position = self._epoch + 1, 0
        return _window_batch(rows)

    def _rank_order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            n = self._n_windows // self.world_size * self.world_size
            perm = (_rng(self.seed, epoch).permutation(self._n_windows) if self.shuffle
                    else np.arange(self._n_windows))[:n]
            self._order = (epoch, perm[self.rank :: self.world_size])
        return self._order[1]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "position": self._position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._epoch, self._position = _checked_state(state, self.batches_per_epoch)


class StreamLoader:
    """Contiguous per-row document streams, for models that carry state from one batch to the next.

    Layout. There are world_size x batch_size rows in all; rank r owns global rows r * batch_size + b for
    b in [0, batch_size). The documents, shuffled once by `seed`, are dealt to the rows (each to the row
    with the fewest tokens so far), so no two rows share a document. A row's stream is its documents back
    to back, each one laid out as a block

        doc tokens, EOS, pad_id ... pad_id      (length rounded up to a multiple of mini_batch_size K)

    so every document starts on a mini-batch boundary. Step s returns tokens [s * seq_len, (s + 1) * seq_len)
    of every row of this rank, so a row's consecutive batches continue one another. Labels follow the
    inputs within a document: the last real token's label is the EOS, while the EOS and the padding have
    label -100 (no label ever points into another document). `doc_start[b, n]` is True when a document
    begins at position n * K of row b in this batch. When a row's stream ends it starts again with the same
    documents in a new order seeded by (seed, global row, row epoch). Rows have different lengths, so
    "epoch" in `state_dict` counts steps in units of `steps_per_epoch`, the steps needed to read the
    longest row once.
    """

    def __init__(
        self,
        docs_tokens: Sequence[np.ndarray],
        eos_id: int,
        pad_id: int,
        seq_len: int,
        batch_size: int,
        mini_batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        _check_positive(
            seq_len=seq_len, batch_size=batch_size, mini_batch_size=mini_batch_size, world_size=world_size
        )
        _check_rank(rank, world_size)
        if seq_len % mini_batch_size:
            raise ValueError(f"seq_len={seq_len} must be a multiple of mini_batch_size={mini_batch_size}")
        self.seq_len, self.batch_size, self.mini_batch_size = seq_len, batch_size, mini_batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.eos_id, self.pad_id = eos_id, pad_id

        self._docs = [d for d in docs_tokens if len(d)]
        n_rows = world_size * batch_size
        if len(self._docs) < n_rows:
            raise ValueError(
                f"the training split has {len(self._docs)} documents, fewer than the "
                f"world_size x batch_size = {n_rows} streams; lower batch_size or add documents"
            )
        block = [_round_up(len(d) + 1, mini_batch_size) for d in self._docs]
        rows = _deal(_rng(seed).permutation(len(self._docs)), block, n_rows)
        self._row_docs = rows[rank * batch_size : (rank + 1) * batch_size]
        self._row_len = [sum(block[i] for i in row) for row in self._row_docs]
        self.steps_per_epoch = -(-max(sum(block[i] for i in row) for row in rows) // seq_len)
        self._step = 0
        self._built: list[dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]] = [
            {} for _ in range(batch_size)
        ]

    @property
    def tokens_per_batch(self) -> int:
        """Token positions in one batch of this rank (padding included)."""
        return self.batch_size * self.seq_len

    @property
    def epoch(self) -> int:
        return self._step // self.steps_per_epoch

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        parts = [self._take(b, self._step * self.seq_len) for b in range(self.batch_size)]
        self._step += 1
        inputs, labels, starts = (np.stack(p) for p in zip(*parts, strict=True))
        return {
            "input_ids": torch.from_numpy(inputs.astype(np.int64)),
            "labels": torch.from_numpy(labels.astype(np.int64)),
            "doc_start": torch.from_numpy(starts),
        }

    def _take(self, b: int, start: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Positions [start, start + seq_len) of local row b's endless stream."""
        k, length = self.mini_batch_size, self._row_len[b]
        pieces = []
        pos, end = start, start + self.seq_len
        while pos < end:
            epoch, offset = divmod(pos, length)
            n = min(end - pos, length - offset)
            inputs, labels, starts = self._row_epoch(b, epoch)
            stop = offset + n
            pieces.append((inputs[offset:stop], labels[offset:stop], starts[offset // k : stop // k]))
            pos += n
        return tuple(np.concatenate(p) for p in zip(*pieces, strict=True))  # type: ignore[return-value]

    def _row_epoch(self, b: int, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        built = self._built[b]
        if epoch not in built:
            for old in [e for e in built if e < epoch - 1]:
                del built[old]
            docs = self._row_docs[b]
            if epoch > 0:
                docs = [
                    docs[i]
                    for i in _rng(self.seed, self.rank * self.batch_size + b, epoch).permutation(len(docs))
                ]
            built[epoch] = self._layout(docs, self._row_len[b])
        return built[epoch]

    def _layout(self, doc_indices: list[int], length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(inputs, labels, doc_start per mini-batch) of one pass over a row's documents."""
        k = self.mini_batch_size
        inputs = np.full(length, self.pad_id, dtype=np.int32)
        labels = np.full(length, IGNORE_INDEX, dtype=np.int32)
        starts = np.zeros(length // k, dtype=bool)
        pos = 0
        for i in doc_indices:
            doc = self._docs[i]
            n = len(doc)
            inputs[pos : pos + n] = doc
            inputs[pos + n] = self.eos_id
            labels[pos : pos + n - 1] = doc[1:]
            labels[pos + n - 1] = self.eos_id
            starts[pos // k] = True
            pos += _round_up(n + 1, k)
        return inputs, labels, starts

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._step // self.steps_per_epoch, "position": self._step % self.steps_per_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, position = _checked_state(state, self.steps_per_epoch)
        self._step = epoch * self.steps_per_epoch + position


class ValidationSet:
    """A fixed list of validation windows, cut like WindowLoader's but not shuffled.

    When the split has more than `max_windows` windows, evenly spaced ones are kept, so the set covers all
    validation documents rather than only the first few.
    """

    def __init__(
        self, docs_tokens: Sequence[np.ndarray], eos_id: int, seq_len: int, max_windows: int
    ) -> None:
        _check_positive(seq_len=seq_len, max_windows=max_windows)
        self.seq_len = seq_len
        self._docs = list(docs_tokens)
        self._eos_id = eos_id
        windows = _windows(_joined(self._docs, eos_id), seq_len)
        if len(windows) == 0:
            total = sum(len(d) + 1 for d in self._docs)
            raise ValueError(
                f"the validation split has {total} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                "raise val_fraction or lower seq_len"
            )
        keep = np.linspace(0, len(windows) - 1, min(max_windows, len(windows))).round().astype(np.int64)
        self._windows = np.ascontiguousarray(windows[keep])

    def __len__(self) -> int:
        return len(self._windows)

    @property
    def num_tokens(self) -> int:
        """Tokens with a loss over the whole set."""
        return len(self._windows) * self.seq_len

    def batches(self, batch_size: int) -> Iterator[Batch]:
        """All windows in order, `batch_size` at a time (the last batch may be smaller)."""
        _check_positive(batch_size=batch_size)
        for i in range(0, len(self._windows), batch_size):
            yield _window_batch(self._windows[i : i + batch_size])

    def long_sequences(self, length: int, max_sequences: int) -> torch.Tensor:
        """int64 [N, length + 1]: the first length + 1 tokens (EOS included) of the longest validation
        documents, one sequence per document, N <= max_sequences; for loss by position in a document."""
        _check_positive(length=length, max_sequences=max_sequences)
        longest = sorted(range(len(self._docs)), key=lambda i: (-len(self._docs[i]), i))
        chosen = [i for i in longest if len(self._docs[i]) + 1 >= length + 1][:max_sequences]
        if not chosen:
            have = max((len(d) + 1 for d in self._docs), default=0)
            raise ValueError(
                f"no validation document has {length + 1} tokens (longest: {have}); lower length"
            )
        rows = [np.append(np.asarray(self._docs[i][: length + 1], np.int64), self._eos_id) for i in chosen]
        return torch.from_numpy(np.stack([r[: length + 1] for r in rows]))


def _joined(docs_tokens: Sequence[np.ndarray], eos_id: int) -> np.ndarray:
    """All documents in one array, each followed by `eos_id`, in the documents' own dtype when it fits."""
    dtype = np.result_type(*[d.dtype for d in docs_tokens]) if docs_tokens else np.dtype(np.int64)
    if not np.issubdtype(dtype, np.integer) or np.iinfo(dtype).max < eos_id:
        dtype = np.dtype(np.int64)
    out = np.empty(sum(len(d) + 1 for d in docs_tokens), dtype=dtype)
    pos = 0
    for d in docs_tokens:
        out[pos : pos + len(d)] = d
        out[pos + len(d)] = eos_id
        pos += len(d) + 1
    return out


def _windows(stream: np.ndarray, seq_len: int) -> np.ndarray:
    n = len(stream) // (seq_len + 1)
    return stream[: n * (seq_len + 1)].reshape(n, seq_len + 1)


def _window_batch(windows: np.ndarray) -> Batch:
    w = windows.astype(np.int64)
    return {"input_ids": torch.from_numpy(w[:, :-1].copy()), "labels": torch.from_numpy(w[:, 1:].copy())}


def _deal(order: np.ndarray, sizes: Sequence[int], n_rows: int) -> list[list[int]]:
    """Give each item of `order` to the row with the smallest total size so far (ties: lowest row)."""
    rows: list[list[int]] = [[] for _ in range(n_rows)]
    heap = [(0, r) for r in range(n_rows)]
    for i in order.tolist():
        total, r = heapq.heappop(heap)
        rows[r].append(i)
        heapq.heappush(heap, (total + sizes[i], r))
    return rows


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([k & (2**64 - 1) for k in keys])


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")


def _check_rank(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")


def _checked_state(state: dict[str, int], per_epoch: int) -> tuple[int, int]:
    epoch, position = int(state["epoch"]), int(state["position"])
    if epoch < 0 or not 0 <= position < per_epoch:
        raise ValueError(f"loader state {state} does not fit this loader ({per_epoch} batches per epoch)")
    return epoch, position
