"""Prepared corpora on disk: sharded flat token files with a document index, read lazily through memmaps.

A prepared corpus is a directory holding ``manifest.json`` and, per shard ``<name>``:

- ``<name>.bin``: the shard's documents back to back, each followed by the tokenizer's EOS (raw uint16, or
  uint32 for vocabularies over 65,535 entries);
- ``<name>.idx.npy``: int64 offsets, document i is ``bin[idx[i] : idx[i + 1] - 1]`` and ``bin[idx[i + 1] - 1]``
  its EOS;
- ``<name>.ids.npy``: uint64 digests of the documents' ids (:func:`tttexp.data.corpus.id_digest`), from which
  the train/validation split is computed at load time for any seed and fraction;
- ``<name>.json``: the shard's tokenizer, dtype and counts. It is written last: a shard without it is
  incomplete (a killed prepare) and is built again.

Opening checks each shard cheaply (sizes, offsets, EOS positions, a sample of ids), never by reading every
token, so a warm start costs the same at any corpus size.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tttexp.data._atomic import temporary_sibling
from tttexp.errors import ConfigError

FORMAT = "tttexp-shards-v1"
MANIFEST = "manifest.json"
_SAMPLE = 4096  # tokens checked at each end of a shard, and EOS positions checked per shard


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id of a vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


class ShardWriter:
    """Streams documents into one shard: tokens go to disk as they arrive; :meth:`finish` publishes it."""

    def __init__(self, directory: Path, name: str, dtype: np.dtype, eos_id: int) -> None:
        self.directory, self.name, self.dtype, self.eos_id = Path(directory), name, np.dtype(dtype), eos_id
        self._bin_tmp = temporary_sibling(self.directory / f"{name}.bin")
        self._file = self._bin_tmp.open("wb")
        self._offsets = [0]
        self._digests: list[int] = []
        self._doc_start = 0
        self.tokens = 0

    @property
    def documents(self) -> int:
        return len(self._digests)

    def extend(self, ids: np.ndarray) -> None:
        """Append part of the current document."""
        if len(ids):
            self._file.write(np.asarray(ids, dtype=self.dtype).tobytes())
            self.tokens += len(ids)

    def end_document(self, digest: int, keep: bool = True) -> None:
        """Close the current document (EOS appended); with keep=False it is dropped from the shard."""
        if not keep or self.tokens == self._doc_start:
            self._file.seek(self._doc_start * self.dtype.itemsize)
            self._file.truncate()
            self.tokens = self._doc_start
            return
        self._file.write(np.array([self.eos_id], dtype=self.dtype).tobytes())
        self.tokens += 1
        self._offsets.append(self.tokens)
        self._digests.append(digest)
        self._doc_start = self.tokens

    def finish(self, tokenizer: str, vocab_size: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write the index and metadata and publish the shard (metadata last); returns the metadata."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._bin_tmp, self.directory / f"{self.name}.bin")
        for suffix, array in ((".idx.npy", np.array(self._offsets, dtype=np.int64)),
                              (".ids.npy", np.array(self._digests, dtype=np.uint64))):
            tmp = temporary_sibling(self.directory / f"{self.name}{suffix}")
            with tmp.open("wb") as f:
                np.save(f, array)
            os.replace(tmp, self.directory / f"{self.name}{suffix}")
        meta = {"format": FORMAT, "tokenizer": tokenizer, "vocab_size": vocab_size, "eos_id": self.eos_id,
                "dtype": self.dtype.name, "tokens": self.tokens, "documents": self.documents, **(extra or {})}
        write_json(self.directory / f"{self.name}.json", meta)
        return meta

    def abandon(self) -> None:
        self._file.close()
        self._bin_tmp.unlink(missing_ok=True)


def write_json(path: Path, value: dict[str, Any]) -> None:
    tmp = temporary_sibling(path)
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


def shard_meta(directory: Path, name: str) -> dict[str, Any] | None:
    """A shard's metadata, or None when the shard is incomplete (no readable metadata file)."""
    try:
        meta = json.loads((Path(directory) / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


@dataclass
class Shard:
    """One opened shard: its tokens (a read-only memmap), document offsets and id digests."""

    name: str
    tokens: np.ndarray
    offsets: np.ndarray
    digests: np.ndarray


def open_shard(directory: Path, name: str, tokenizer: str, vocab_size: int, eos_id: int) -> Shard:
    """Open and check a complete shard; a shard that is empty, corrupt or of another tokenizer is refused in
    one line (:class:`ConfigError`) that names it and leaves every file in place."""
    directory = Path(directory)
    where = directory / f"{name}.bin"
    meta = shard_meta(directory, name)
    if meta is None:
        raise ConfigError(f"prepared shard {where} has no readable metadata ({name}.json); run prepare again")
    if meta.get("tokenizer") != tokenizer or meta.get("vocab_size") != vocab_size or meta.get("eos_id") != eos_id:
        raise ConfigError(f"prepared shard {where} was made with tokenizer {meta.get('tokenizer')}, not {tokenizer}; "
                          "point data.prepared_dir elsewhere or delete that shard and prepare again")
    dtype = token_dtype(vocab_size)
    n_tokens, n_docs = int(meta.get("tokens", -1)), int(meta.get("documents", -1))
    size = where.stat().st_size if where.is_file() else -1
    if size <= 0 or n_tokens <= 0 or n_docs <= 0:
        raise ConfigError(f"prepared shard {where} is empty ({max(size, 0)} bytes, {max(n_tokens, 0)} tokens); "
                          "delete it and prepare again (the other shards are kept)")
    if meta.get("dtype") != dtype.name or size != n_tokens * dtype.itemsize:
        raise ConfigError(f"prepared shard {where} is corrupt: {size} bytes where its metadata says {n_tokens} "
                          f"{meta.get('dtype')} tokens; delete it and prepare again (the other shards are kept)")
    try:
        offsets = np.load(directory / f"{name}.idx.npy")
        digests = np.load(directory / f"{name}.ids.npy")
    except (OSError, ValueError) as err:
        raise ConfigError(f"prepared shard {where}: its index is unreadable ({type(err).__name__}); delete the "
                          "shard and prepare again (the other shards are kept)") from None
    tokens = np.memmap(where, dtype=dtype, mode="r")
    problem = _index_problem(tokens, offsets, digests, n_docs, vocab_size, eos_id)
    if problem:
        raise ConfigError(f"prepared shard {where} is corrupt: {problem}; delete it and prepare again "
                          "(the other shards are kept)")
    return Shard(name, tokens, offsets, digests)


def _index_problem(tokens: np.ndarray, offsets: np.ndarray, digests: np.ndarray, n_docs: int, vocab_size: int,
                   eos_id: int) -> str | None:
    if offsets.dtype != np.int64 or offsets.shape != (n_docs + 1,) or digests.shape != (n_docs,):
        return f"its index does not list {n_docs} documents"
    if offsets[0] != 0 or offsets[-1] != len(tokens) or np.any(np.diff(offsets) < 1):
        return "its document offsets do not cover the token file"
    ends = offsets[1:][np.linspace(0, n_docs - 1, min(n_docs, _SAMPLE)).astype(np.int64)] - 1
    if np.any(tokens[ends] != eos_id):
        return "a document does not end with the EOS token"
    ends_of_file = np.concatenate([tokens[:_SAMPLE], tokens[-_SAMPLE:]])
    if ends_of_file.size and int(ends_of_file.max()) >= vocab_size:
        return f"it holds ids outside the vocabulary of {vocab_size}"
    return None


class Documents:
    """Documents of a prepared corpus (without their EOS), as a sequence of read-only array views."""

    def __init__(self, shards: list[Shard], shard_of: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> None:
        self._shards, self._shard_of, self._starts, self.lengths = shards, shard_of, starts, lengths

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self._starts[i])
        return self._shards[int(self._shard_of[i])].tokens[start : start + int(self.lengths[i])]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def subset(self, keep: np.ndarray) -> Documents:
        return Documents(self._shards, self._shard_of[keep], self._starts[keep], self.lengths[keep])


class SegmentStream:
    """The training documents joined (each followed by its EOS) as one stream, read lazily from the shards.

    Consecutive documents of a shard form one segment, so reading a window is one or two memmap slices.
    """

    def __init__(self, shards: list[Shard], seg_shard: np.ndarray, seg_start: np.ndarray, seg_len: np.ndarray):
        self._tokens = [s.tokens for s in shards]
        self._shard, self._start = seg_shard, seg_start
        self._cum = np.concatenate([[0], np.cumsum(seg_len)]).astype(np.int64)
        self.dtype = self._tokens[0].dtype if self._tokens else np.dtype(np.uint16)

    def __len__(self) -> int:
        return int(self._cum[-1])

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) of the stream."""
        out = np.empty(n, dtype=self.dtype)
        seg = int(np.searchsorted(self._cum, start, side="right")) - 1
        done = 0
        while done < n:
            offset = start + done - int(self._cum[seg])
            take = min(n - done, int(self._cum[seg + 1]) - (start + done))
            begin = int(self._start[seg]) + offset
            out[done : done + take] = self._tokens[int(self._shard[seg])][begin : begin + take]
            done += take
            seg += 1
        return out


class PreparedCorpus:
    """All documents of a prepared corpus directory, in order, with the split and limits applied on demand."""

    def __init__(self, directory: Path | str, tokenizer: str, vocab_size: int, eos_id: int) -> None:
        self.directory = Path(directory)
        try:
            manifest = json.loads((self.directory / MANIFEST).read_text())
        except (OSError, ValueError):
            raise ConfigError(f"{self.directory} holds no prepared corpus (no readable {MANIFEST}); "
                              "run python -m tttexp.prepare") from None
        self.manifest = manifest
        names = [n for n in manifest.get("shards", []) if (shard_meta(self.directory, n) or {}).get("documents") != 0]
        self.shards = [open_shard(self.directory, n, tokenizer, vocab_size, eos_id) for n in names]
        counts = [len(s.digests) for s in self.shards]
        self.shard_of = np.repeat(np.arange(len(self.shards), dtype=np.int32), counts)
        self.starts = np.concatenate([s.offsets[:-1] for s in self.shards] or [np.zeros(0, np.int64)])
        self.lengths = np.concatenate([np.diff(s.offsets) - 1 for s in self.shards] or [np.zeros(0, np.int64)])
        self.digests = np.concatenate([s.digests for s in self.shards] or [np.zeros(0, np.uint64)])

    @property
    def num_documents(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        """Tokens with one EOS per document."""
        return int(self.lengths.sum()) + self.num_documents

    def prefix(self, max_documents: int | None, max_tokens: int | None) -> int:
        """How many leading documents the limits keep (the document that reaches max_tokens included)."""
        n = self.num_documents if max_documents is None else min(max_documents, self.num_documents)
        if max_tokens is not None:
            cum = np.cumsum(self.lengths[:n] + 1)
            n = min(n, int(np.searchsorted(cum, max_tokens, side="left")) + 1)
        return n

    def documents(self, keep: np.ndarray) -> Documents:
        """The documents selected by a boolean mask over the corpus (in corpus order)."""
        return Documents(self.shards, self.shard_of, self.starts, self.lengths).subset(keep)

    def stream(self, keep: np.ndarray) -> SegmentStream:
        """The selected documents joined with their EOS tokens, without copying them."""
        idx = np.flatnonzero(keep)
        if len(idx) == 0:
            return SegmentStream(self.shards, *(np.zeros(0, np.int64),) * 3)
        shard = self.shard_of[idx]
        new = np.ones(len(idx), dtype=bool)
        new[1:] = (np.diff(idx) != 1) | (np.diff(shard) != 0)
        seg_of = np.cumsum(new) - 1
        seg_len = np.bincount(seg_of, weights=self.lengths[idx] + 1).astype(np.int64)
        return SegmentStream(self.shards, shard[new], self.starts[idx][new], seg_len)
