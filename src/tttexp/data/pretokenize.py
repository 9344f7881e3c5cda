"""Pre-tokenization: a corpus of any size tokenized once, by a process pool, into the shards of data/shards.py.

Sources:
- files (the shipped corpus, ``text_files``): planned from names, sizes and mtimes only. Files are grouped into
  shards whose boundaries depend on the file ids (a file ends a shard when a hash of its id says so, so the
  groups are stable when files change or are added); a shard is named by a digest of its files' (id, size,
  mtime) and the tokenizer, so a changed file invalidates only its shard. Files over ``PIECE_BYTES`` are read in
  pieces cut at line ends.
- hub datasets (``hf``, or a local parquet/jsonl/arrow directory through ``datasets``): rows are streamed into
  shards of about ``shard_tokens`` tokens until the stream, ``max_documents`` or ``max_tokens`` ends; the next
  prepare continues from the last complete shard (which also serves a larger limit later).

Memory stays bounded: the parent keeps at most two tasks (a few MB of text) per worker in flight, and tokens
go to disk as they come back. A file lock on the corpus directory lets one process prepare while the others
(other ranks) wait and then find it warm.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from tttexp.data import shards as S
from tttexp.data.corpus import decode_bytes, hf_document_id, hf_rows, id_digest, warn_replaced
from tttexp.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

PIECE_BYTES = 4 << 20  # the largest text handed to one encode call: bounds a worker's memory
TASK_BYTES = 1 << 20  # small files are grouped into tasks of about this much text
SHARD_BYTES = 64 << 20  # text per file shard, on average
SHARD_TOKENS = 32 << 20  # tokens per hub-dataset shard
POOL_MIN_BYTES = 32 << 20  # smaller file corpora are tokenized in-process (starting workers costs more)


@dataclass(frozen=True)
class FileUnit:
    id: str
    path: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Source:
    """What to prepare: files (id, path) or a `datasets` stream; `label` names it in the corpus directory."""

    label: str
    files: tuple[tuple[str, str], ...] = ()
    hf: tuple[str, str | None, str, str] | None = None  # (dataset, config, split, text field)


def corpus_dir(root: Path, source: Source, tokenizer: Tokenizer, max_documents: int | None) -> Path:
    """The directory of a source's prepared corpus under `root`, from names and file stats, never from text."""
    h = hashlib.sha256(f"{S.FORMAT}\x00{tokenizer.name}\x00{source.label}".encode())
    if source.hf is not None:
        h.update(json.dumps(source.hf).encode())
        local = Path(source.hf[0]).expanduser()
        if local.is_dir():  # a local dataset: its files' names, sizes and mtimes
            for f in sorted(p for p in local.rglob("*") if p.is_file()):
                st = f.stat()
                h.update(f"\x00{f.relative_to(local)}\x00{st.st_size}\x00{st.st_mtime_ns}".encode())
    else:  # the file list itself; each shard's name covers its files' sizes and mtimes
        h.update(json.dumps([source.files[:max_documents] if max_documents else source.files]).encode())
    return Path(root).expanduser() / f"{source.label}-{h.hexdigest()[:16]}"


def prepare(
    source: Source, tokenizer: Tokenizer, root: Path | str, *, max_documents: int | None = None,
    max_tokens: int | None = None, workers: int | None = None, progress: bool = True,
    shard_bytes: int = SHARD_BYTES, shard_tokens: int = SHARD_TOKENS,
) -> Path:
    """Prepare `source` (or find it prepared) under `root`; returns the corpus directory.

    `workers`: tokenizing processes (None: every core, in-process for small file corpora; 1: in-process)."""
    directory = corpus_dir(Path(root), source, tokenizer, max_documents)
    step = (partial(_prepare_stream, shard_tokens=shard_tokens) if source.hf is not None
            else partial(_prepare_files, shard_bytes=shard_bytes))
    args = (directory, source, tokenizer, max_documents, max_tokens, workers, progress)
    if directory.is_dir() and step(*args, build=False):  # warm: no lock, no write (a read-only share works)
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    with _locked(directory):  # other processes wait here, then find it warm
        step(*args, build=True)
    return directory


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    with (directory / ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            for stale in directory.glob(".*.tmp"):  # left by a killed prepare: never published, never read
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- files -----------------------------------------------------------------------------------------------------


def plan_files(files: Iterable[tuple[str, str]], tokenizer: str, shard_bytes: int) -> list[tuple[str, list[FileUnit]]]:
    """(shard name, files) in corpus order; boundaries fall after files whose id hash is 0 mod K, K ~ the
    number of average-size files that fill `shard_bytes` (and a group over 4 x shard_bytes ends anyway)."""
    units = []
    for doc_id, path in files:
        st = os.stat(path)
        units.append(FileUnit(doc_id, str(path), st.st_size, st.st_mtime_ns))
    if not units:
        return []
    mean = max(1.0, sum(u.size for u in units) / len(units))
    k = 2 ** max(0, round(math.log2(max(1.0, shard_bytes / mean))))
    groups: list[list[FileUnit]] = [[]]
    size = 0
    for u in units:
        groups[-1].append(u)
        size += u.size
        if id_digest(u.id) % k == k - 1 or size >= 4 * shard_bytes:
            groups.append([])
            size = 0
    plan = []
    for group in (g for g in groups if g):
        h = hashlib.sha256(f"{S.FORMAT}\x00{tokenizer}".encode())
        for u in group:
            h.update(f"\x00{u.id}\x00{u.size}\x00{u.mtime_ns}".encode())
        plan.append((f"shard-{h.hexdigest()[:20]}", group))
    return plan


def _prepare_files(directory: Path, source: Source, tokenizer: Tokenizer, max_documents: int | None,
                   max_tokens: int | None, workers: int | None, progress: bool, shard_bytes: int,
                   build: bool) -> bool:
    """Build what is missing (build=True) or only say whether nothing is (build=False); True when prepared."""
    files = source.files[:max_documents] if max_documents else source.files
    plan = plan_files(files, tokenizer.name, shard_bytes)
    done = {name: m for name, _ in plan if (m := S.shard_meta(directory, name))}
    needed = _needed_shards(plan, done, max_tokens)
    if not needed:
        if build:
            _write_files_manifest(directory, source, tokenizer, plan, done)
        _warm_line(directory, [n for n, _ in plan if n in done], done)
        return True
    if not build:
        return False
    todo = [(i, name, group) for i, (name, group) in enumerate(plan) if i in needed]
    total = sum(u.size for _, _, group in todo for u in group)
    n_workers = _workers(workers, total)
    bar = _Progress(total, "B", progress, f"preparing {source.label} with {n_workers} process(es)")
    bad = [0, 0, ""]
    stop = [False]

    def tasks() -> Iterator[tuple[tuple, list[tuple]]]:
        for _, name, group in todo:
            if stop[0]:
                return
            yield from _file_tasks(name, group)

    writer: S.ShardWriter | None = None
    blank, doc_bad = True, False
    try:
        for pieces_meta, results in _ordered(tasks(), tokenizer, n_workers):
            for (name, unit, last_piece, last_in_shard, nbytes), (ids, is_blank, bad_bytes) in zip(
                    pieces_meta, results, strict=True):
                if writer is None:
                    writer = S.ShardWriter(directory, name, S.token_dtype(tokenizer.vocab_size), tokenizer.eos_id)
                writer.extend(ids)
                blank = blank and is_blank
                if bad_bytes:
                    bad[0], bad[2], doc_bad = bad[0] + bad_bytes, bad[2] or unit.path, True
                if last_piece:
                    writer.end_document(id_digest(unit.id), keep=not blank)
                    bad[1] += doc_bad
                    blank, doc_bad = True, False
                bar.advance(nbytes, len(ids))
                if last_in_shard:
                    done[name] = writer.finish(tokenizer.name, tokenizer.vocab_size)
                    writer = None
                    _write_files_manifest(directory, source, tokenizer, plan, done)
                    if max_tokens is not None and _prefix_tokens(plan, done) >= max_tokens:
                        stop[0] = True
            if stop[0] and writer is None:
                break
    finally:
        if writer is not None:
            writer.abandon()
        bar.close()
    if bad[0]:
        warn_replaced(bad[0], max(bad[1], 1), bad[2])
    _write_files_manifest(directory, source, tokenizer, plan, done)
    keep = {name for name, _ in plan}
    for stale in directory.glob("shard-*"):  # shards of files that changed or left the corpus
        if stale.name.split(".")[0] not in keep:
            stale.unlink(missing_ok=True)
    return True


def _prefix_tokens(plan: list, done: dict) -> int:
    """Tokens in the complete prefix of the plan."""
    tokens = 0
    for name, _ in plan:
        if name not in done:
            break
        tokens += int(done[name]["tokens"])
    return tokens


def _needed_shards(plan: list, done: dict, max_tokens: int | None) -> set[int]:
    """Indices of the plan's shards still to build: none once the complete prefix reaches max_tokens."""
    tokens = 0
    for i, (name, _) in enumerate(plan):
        if max_tokens is not None and tokens >= max_tokens:
            return set()
        if name not in done:
            return {j for j in range(i, len(plan)) if plan[j][0] not in done}
        tokens += int(done[name]["tokens"])
    return set()


def _write_files_manifest(directory: Path, source: Source, tokenizer: Tokenizer, plan: list, done: dict) -> None:
    names = []
    for name, _ in plan:  # the complete prefix of the plan
        if name not in done:
            break
        names.append(name)
    _write_manifest(directory, source, tokenizer, names, done, complete=len(names) == len(plan))


def _file_tasks(name: str, group: list[FileUnit]) -> Iterator[tuple[tuple, list[tuple]]]:
    """Tasks of about PIECE_BYTES: several small files, or one piece of a large one. A task is what a worker
    gets (paths and byte ranges); its meta is what the parent needs to write the results."""
    batch, meta, size = [], [], 0
    for j, unit in enumerate(group):
        cuts = list(range(0, max(unit.size, 1), PIECE_BYTES)) + [unit.size]
        for p, (a, b) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)):
            batch.append((unit.path, a, b, unit.size))
            last_piece = p == len(cuts) - 2
            meta.append((name, unit, last_piece, last_piece and j == len(group) - 1, b - a))
            size += b - a
            if size >= TASK_BYTES:
                yield ("files", batch), meta
                batch, meta, size = [], [], 0
    if batch:
        yield ("files", batch), meta


def _read_piece(path: str, a: int, b: int, size: int) -> bytes:
    """Bytes [s(a), s(b)) of a file, where s(x) is the first line start at or after x (s(0) = 0, s(size) =
    size): adjacent pieces meet exactly, and no piece cuts a line or a UTF-8 character."""
    with open(path, "rb") as f:
        start, end = _line_start(f, a, size), _line_start(f, b, size)
        if end <= start:
            return b""
        f.seek(start)
        return f.read(end - start)


def _line_start(f: Any, x: int, size: int) -> int:
    if x <= 0 or x >= size:
        return min(max(x, 0), size)
    f.seek(x - 1)
    pos = x - 1
    while True:
        chunk = f.read(1 << 16)
        if not chunk:
            return size
        hit = chunk.find(b"\n")
        if hit >= 0:
            return pos + hit + 1
        pos += len(chunk)


# --- hub datasets ----------------------------------------------------------------------------------------------


def _prepare_stream(directory: Path, source: Source, tokenizer: Tokenizer, max_documents: int | None,
                    max_tokens: int | None, workers: int | None, progress: bool, shard_tokens: int,
                    build: bool) -> bool:
    assert source.hf is not None
    name, config, split, field = source.hf
    manifest = _read_manifest(directory)
    shards, ends = list(manifest.get("shards", [])), list(manifest.get("row_ends", []))
    done = {}
    for i, shard in enumerate(shards):  # keep the complete prefix; a missing shard is made again from its rows
        meta = S.shard_meta(directory, shard)
        if meta is None:
            shards, ends = shards[:i], ends[:i]
            break
        done[shard] = meta
    docs = sum(int(done[s]["documents"]) for s in shards)
    tokens = sum(int(done[s]["tokens"]) for s in shards)
    finished = bool(manifest.get("complete")) and len(shards) == len(manifest.get("shards", []))
    if finished or _limits_met(docs, tokens, max_documents, max_tokens):
        _warm_line(directory, shards, done)
        return True
    if not build:
        return False
    rows = ends[-1] if ends else 0
    n_workers = _workers(workers, None)
    unit, total = ("tok", max_tokens) if max_tokens else ("doc", max_documents)
    bar = _Progress(total, unit, progress, f"preparing {name} with {n_workers} process(es)", initial=(
        tokens if unit == "tok" else docs))
    submitted_docs = [docs]
    stop = [False]

    def tasks() -> Iterator[tuple[tuple, list[tuple]]]:
        texts, meta, size = [], [], 0
        for row, text in hf_rows(name, config, split, field, skip=rows):
            if stop[0] or (max_documents is not None and submitted_docs[0] >= max_documents):
                break
            texts.append(text)
            meta.append(row)
            size += len(text)
            submitted_docs[0] += bool(text.strip())
            if size >= TASK_BYTES:
                yield ("texts", texts), meta
                texts, meta, size = [], [], 0
        if texts:
            yield ("texts", texts), meta

    writer = None
    complete = True
    try:
        for rows_meta, results in _ordered(tasks(), tokenizer, n_workers):
            if writer is None:
                writer = S.ShardWriter(directory, f"shard-{len(shards):05d}", S.token_dtype(tokenizer.vocab_size),
                                       tokenizer.eos_id)
            for row, (ids, is_blank, _) in zip(rows_meta, results, strict=True):
                writer.extend(ids)
                writer.end_document(id_digest(hf_document_id(name, config, split, row)), keep=not is_blank)
                bar.advance(1 if unit == "doc" and not is_blank else 0, len(ids) + (not is_blank))
            rows = rows_meta[-1] + 1
            reached = _limits_met(docs + writer.documents, tokens + writer.tokens, max_documents, max_tokens)
            if writer.tokens >= shard_tokens or reached:
                docs, tokens = docs + writer.documents, tokens + writer.tokens
                if writer.documents:
                    done[writer.name] = writer.finish(tokenizer.name, tokenizer.vocab_size, {"row_end": rows})
                    shards.append(writer.name)
                    ends.append(rows)
                    _write_manifest(directory, source, tokenizer, shards, done, complete=False, row_ends=ends)
                else:
                    writer.abandon()
                writer = None
            if reached:
                stop[0], complete = True, False
                break
        if writer is not None and writer.documents:
            done[writer.name] = writer.finish(tokenizer.name, tokenizer.vocab_size, {"row_end": rows})
            shards.append(writer.name)
            ends.append(rows)
            writer = None
    finally:
        if writer is not None:
            writer.abandon()
        bar.close()
    _write_manifest(directory, source, tokenizer, shards, done, complete=complete, row_ends=ends)
    return True


def _limits_met(docs: int, tokens: int, max_documents: int | None, max_tokens: int | None) -> bool:
    return (max_documents is not None and docs >= max_documents) or (max_tokens is not None and tokens >= max_tokens)


# --- shared ----------------------------------------------------------------------------------------------------


def _read_manifest(directory: Path) -> dict[str, Any]:
    try:
        value = json.loads((directory / S.MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _write_manifest(directory: Path, source: Source, tokenizer: Tokenizer, names: list[str], done: dict,
                    complete: bool, **extra: Any) -> None:
    S.write_json(directory / S.MANIFEST, {
        "format": S.FORMAT, "source": source.label, "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, "complete": complete,
        "documents": sum(int(done[n]["documents"]) for n in names),
        "tokens": sum(int(done[n]["tokens"]) for n in names), "shards": names, **extra,
    })


def _warm_line(directory: Path, names: list[str], done: dict) -> None:
    tokens = sum(int(done[n]["tokens"]) for n in names)
    docs = sum(int(done[n]["documents"]) for n in names)
    log.info("prepared corpus found (warm cache): %s: %d documents, %s tokens in %d shard(s)",
             directory, docs, f"{tokens:,}", len(names))


def _workers(requested: int | None, total_bytes: int | None) -> int:
    if requested is not None:
        if requested < 1:
            raise ValueError(f"data.workers must be positive or null (every core), got {requested}")
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 1 if total_bytes is not None and total_bytes < POOL_MIN_BYTES else cores


class _Progress:
    """A tqdm bar over bytes, tokens or documents, with tokens/s; silent when disabled."""

    def __init__(self, total: int | None, unit: str, enabled: bool, desc: str, initial: int = 0) -> None:
        self._tokens, self._start, self._unit = 0, time.perf_counter(), unit
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit=unit, unit_scale=True, desc=desc, file=sys.stderr,
                             mininterval=1.0, delay=1.0, dynamic_ncols=True)

    def advance(self, n: int, tokens: int) -> None:
        self._tokens += tokens
        if self._bar is not None:
            self._bar.update(tokens if self._unit == "tok" else n)
            rate = self._tokens / max(time.perf_counter() - self._start, 1e-9)
            self._bar.set_postfix_str(f"{rate / 1e6:.2f}M tok/s", refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tokens:
            seconds = time.perf_counter() - self._start
            log.info("tokenized %s tokens in %.1f s (%.2fM tokens/s)", f"{self._tokens:,}", seconds,
                     self._tokens / max(seconds, 1e-9) / 1e6)


# --- workers ---------------------------------------------------------------------------------------------------

_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(tokenizer: Tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _worker_encode(task: tuple) -> list[tuple[np.ndarray, bool, int]]:
    assert _WORKER_TOKENIZER is not None
    return encode_task(_WORKER_TOKENIZER, task)


def encode_task(tokenizer: Tokenizer, task: tuple) -> list[tuple[np.ndarray, bool, int]]:
    """(ids, blank, bytes not UTF-8) for each text of a task: ("texts", [str]) or ("files", [(path, a, b, size)])."""
    kind, items = task
    decoded = [decode_bytes(_read_piece(*item)) for item in items] if kind == "files" else [(t, 0) for t in items]
    texts = [text for text, _ in decoded]
    dtype = S.token_dtype(tokenizer.vocab_size)
    ids = tokenizer.encode_batch(texts)
    return [(np.array(i, dtype=dtype), not t.strip(), bad) for i, t, (_, bad) in zip(ids, texts, decoded, strict=True)]


def _ordered(tasks: Iterator[tuple[tuple, Any]], tokenizer: Tokenizer, workers: int) -> Iterator[tuple[Any, list]]:
    """(meta, results) of each task in order; at most 2 x workers tasks in flight (bounded memory)."""
    if workers <= 1:
        for task, meta in tasks:
            yield meta, encode_task(tokenizer, task)
        return
    # Forked workers start at once (spawned ones would import the app again). They tokenize on one thread each:
    # the variable, set while forking, also keeps `tokenizers` from warning about a fork after parallel use.
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = multiprocessing.get_context("fork").Pool(workers, initializer=_init_worker, initargs=(tokenizer,))
    finally:
        if before is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before
    try:
        in_flight: deque = deque()
        for task, meta in tasks:
            while len(in_flight) >= 2 * workers:
                m, pending = in_flight.popleft()
                yield m, pending.get()
            in_flight.append((meta, pool.apply_async(_worker_encode, (task,))))
        while in_flight:
            m, pending = in_flight.popleft()
            yield m, pending.get()
    finally:
        pool.terminate()
        pool.join()


def source_texts(source: Source, keep: Callable[[str], bool], max_bytes: int) -> list[str]:
    """Texts of the documents for which `keep(id)` holds, in corpus order, until `max_bytes` of text: the
    bounded sample a tokenizer is trained on."""
    texts, size = [], 0
    if source.hf is not None:
        name, config, split, field = source.hf
        rows: Iterable[tuple[str, str]] = (
            (hf_document_id(name, config, split, i), t) for i, t in hf_rows(name, config, split, field))
    else:
        rows = ((doc_id, "") for doc_id, _ in source.files)
    paths = dict(source.files)
    for doc_id, text in rows:
        if size >= max_bytes:
            break
        if not keep(doc_id):
            continue
        if source.hf is None:
            with open(paths[doc_id], "rb") as f:
                text = decode_bytes(f.read(max_bytes - size))[0]
        if text.strip():
            texts.append(text)
            size += len(text.encode("utf-8", errors="surrogatepass"))
    return texts
