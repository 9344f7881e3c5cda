"""Pre-tokenized shards: same windows as the in-memory loader, a pool, stat-only cache keys, resume, bad shards."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tttexp.data import Document, Tokenizer, WindowLoader
from tttexp.data import pretokenize as P
from tttexp.data.corpus import split_documents
from tttexp.data.shards import PreparedCorpus
from tttexp.errors import ConfigError


def _files(tmp_path: Path, docs: list[Document]) -> P.Source:
    folder = tmp_path / "texts"
    folder.mkdir()
    for i, doc in enumerate(docs):
        (folder / f"{i:03d}-{doc.id}.txt").write_text(doc.text, encoding="utf-8")
    return P.Source("text_files", files=tuple((p.as_posix(), str(p)) for p in sorted(folder.glob("*.txt"))))


def _open(directory: Path, tok: Tokenizer) -> PreparedCorpus:
    return PreparedCorpus(directory, tok.name, tok.vocab_size, tok.eos_id)


def test_shards_give_the_in_memory_loaders_windows(tmp_path, small_docs, bpe):
    docs = small_docs[:8]
    source = _files(tmp_path, docs)
    directory = P.prepare(source, bpe, tmp_path / "out", workers=1, progress=False, shard_bytes=60_000)
    corpus = _open(directory, bpe)
    assert len(corpus.shards) >= 2 and corpus.num_documents == 8
    assert [corpus.documents(np.ones(8, bool))[i].tolist() for i in range(8)] == [bpe.encode(d.text) for d in docs]
    keep = np.arange(8) % 3 != 1  # a split that leaves gaps inside shards
    lazy = WindowLoader(corpus.stream(keep), bpe.eos_id, 32, 4, seed=3)
    eager = WindowLoader([np.array(bpe.encode(d.text)) for d, k in zip(docs, keep, strict=True) if k],
                         bpe.eos_id, 32, 4, seed=3)
    assert lazy.batches_per_epoch == eager.batches_per_epoch
    for _ in range(lazy.batches_per_epoch + 2):  # into the second epoch
        a, b = next(lazy), next(eager)
        assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in ("input_ids", "labels"))


def test_pool_and_pieces_of_large_files(tmp_path, small_docs, bpe, monkeypatch):
    """Two worker processes write the same shards as one; a file larger than a piece is read in pieces cut at
    line ends and still decodes to its text."""
    monkeypatch.setattr(P, "PIECE_BYTES", 20_000)
    monkeypatch.setattr(P, "TASK_BYTES", 20_000)
    source = _files(tmp_path, small_docs[:6])
    one = P.prepare(source, bpe, tmp_path / "one", workers=1, progress=False)
    two = P.prepare(source, bpe, tmp_path / "two", workers=2, progress=False)
    (a,), (b,) = sorted(one.glob("*.bin")), sorted(two.glob("*.bin"))
    assert a.name == b.name and a.read_bytes() == b.read_bytes()
    corpus = _open(two, bpe)
    for i, doc in enumerate(small_docs[:6]):
        assert bpe.decode(corpus.documents(np.ones(6, bool))[i]) == doc.text


def test_cache_key_reads_no_text_and_a_changed_file_rebuilds_only_its_shard(tmp_path, small_docs, bpe, caplog):
    source = _files(tmp_path, small_docs[:12])
    first = P.prepare(source, bpe, tmp_path / "out", workers=1, progress=False, shard_bytes=60_000)
    shards = {p.name: p.stat().st_mtime_ns for p in first.glob("*.bin")}
    assert len(shards) >= 3
    path = Path(source.files[0][1])  # same size and mtime, other bytes: a warm cache never reads them
    stat = path.stat()
    path.write_bytes(b"x" * stat.st_size)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    caplog.clear()  # only what the warm prepare logs (an earlier in-process app may have raised the level)
    with caplog.at_level(logging.INFO, logger="tttexp.data.pretokenize"):
        assert P.prepare(source, bpe, tmp_path / "out", workers=1, progress=False, shard_bytes=60_000) == first
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["prepared corpus found"]
    last = Path(source.files[-1][1])
    last.write_text(last.read_text() + "\nOne more line.\n")
    P.prepare(source, bpe, tmp_path / "out", workers=1, progress=False, shard_bytes=60_000)
    now = {p.name: p.stat().st_mtime_ns for p in first.glob("*.bin")}
    assert len(set(now) - set(shards)) == 1 and len(set(shards) - set(now)) == 1  # one new, the old one removed
    assert all(now[n] == shards[n] for n in set(now) & set(shards))
    assert _open(first, bpe).documents(np.ones(12, bool))[11].tolist() == bpe.encode(last.read_text())


_PREPARE = """
import sys
from tttexp.data import build_tokenizer
from tttexp.data import pretokenize as P
tok = build_tokenizer(sys.argv[1], train_texts=None, vocab_size=0, cache_dir=sys.argv[2])
files = tuple((p, p) for p in sys.argv[4:])
P.prepare(P.Source("text_files", files=files), tok, sys.argv[3], workers=1, progress=False, shard_bytes=50_000)
"""


def test_kill_9_during_prepare_resumes_from_the_last_complete_shard(tmp_path, shipped_docs, bpe):
    from tttexp.data import build_tokenizer

    source = _files(tmp_path, shipped_docs[::8])  # about 1.5 MB in about 30 shards
    bpe = build_tokenizer(bpe.source, train_texts=None, vocab_size=0, cache_dir=tmp_path)  # as the child loads it
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", _PREPARE, bpe.source, str(tmp_path), str(out),
                             *[p for _, p in source.files]])
    deadline = time.time() + 60
    while time.time() < deadline and len(list(out.glob("*/shard-*.json"))) < 2:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (directory,) = out.iterdir()
    kept = {p.name: p.stat().st_mtime_ns for p in directory.glob("shard-*.json")}
    assert len(kept) >= 2 and len(kept) < 30, "the prepare was not cut mid-way"
    P.prepare(source, bpe, out, workers=1, progress=False, shard_bytes=50_000)
    assert all(p.stat().st_mtime_ns == kept[p.name] for p in directory.glob("shard-*.json") if p.name in kept)
    assert not list(directory.glob(".*.tmp"))
    fresh = P.prepare(source, bpe, tmp_path / "fresh", workers=1, progress=False, shard_bytes=50_000)
    assert sorted((p.name, p.read_bytes()) for p in directory.glob("*.bin")) == \
        sorted((p.name, p.read_bytes()) for p in fresh.glob("*.bin"))


@pytest.mark.parametrize("damage, expected", [
    ("truncate", "is corrupt"), ("empty", "is empty"), ("tokenizer", "was made with tokenizer"),
])
def test_bad_shards_are_refused_in_one_line_and_kept(tmp_path, small_docs, bpe, damage, expected, one_line):
    source = _files(tmp_path, small_docs[:6])
    directory = P.prepare(source, bpe, tmp_path / "out", workers=1, progress=False, shard_bytes=60_000)
    victim = sorted(directory.glob("*.bin"))[0]
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:-10])
    elif damage == "empty":
        victim.write_bytes(b"")
    else:  # the same shard prepared with another tokenizer, copied over this one
        from tttexp.data import build_tokenizer

        other = build_tokenizer("bpe", train_texts=[d.text for d in small_docs[6:12]], vocab_size=300,
                                cache_dir=tmp_path / "other")
        elsewhere = P.prepare(source, other, tmp_path / "elsewhere", workers=1, progress=False, shard_bytes=60_000)
        foreign = sorted(elsewhere.glob("shard-*.json"))[0]
        shutil.copy(foreign, directory / victim.name.replace(".bin", ".json"))
    before = sorted(p.name for p in directory.iterdir())
    with pytest.raises(ConfigError) as refused:
        _open(P.prepare(source, bpe, tmp_path / "out", workers=1, progress=False, shard_bytes=60_000), bpe)
    assert expected in one_line(refused) and victim.name in str(refused.value)
    assert sorted(p.name for p in directory.iterdir()) == before


def test_hf_local_parquet_streams_into_shards_and_extends_them(tmp_path, small_docs, bpe, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tttexp.data import DataModule

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = [d.text for d in small_docs[:12]]
    rows.insert(3, "   ")  # a blank row is skipped but keeps its row number
    (tmp_path / "ds").mkdir()
    pq.write_table(pa.table({"text": rows}), tmp_path / "ds" / "train.parquet")

    def module(**limits) -> DataModule:
        return DataModule(source="hf", hf_dataset=str(tmp_path / "ds"), seq_len=32, batch_size=2, val_fraction=0.2,
                          cache_dir=str(tmp_path / "cache"), workers=1, **limits)

    dm = module(max_documents=6)
    dm.setup(tokenizer=bpe)
    (directory,) = (tmp_path / "cache" / "prepared").iterdir()
    assert dm.num_train_tokens + dm.num_val_tokens == sum(len(bpe.encode(t)) + 1 for t in rows[:7] if t.strip())
    first = {p.name: p.stat().st_mtime_ns for p in directory.glob("*.bin")}
    dm = module(max_tokens=10**9)  # more than there is: streams on from where the last shard ended
    dm.setup(tokenizer=bpe)
    assert dm.num_train_tokens + dm.num_val_tokens == sum(len(bpe.encode(t)) + 1 for t in rows if t.strip())
    assert all(p.stat().st_mtime_ns == first[p.name] for p in directory.glob("*.bin") if p.name in first)
    corpus = _open(directory, bpe)
    assert corpus.manifest["complete"] and corpus.num_documents == 12
    docs = [Document(f"{tmp_path / 'ds'}//train/{i}", t) for i, t in enumerate(rows) if t.strip()]
    _, val = split_documents(docs, 0.2, seed=0)  # the same held-out documents as the in-memory split
    assert sorted(len(d) for d in dm.val_set._docs) == sorted(len(bpe.encode(d.text)) for d in val)


def test_tokenizer_sample_is_bounded(tmp_path, small_docs):
    source = _files(tmp_path, small_docs[:10])
    texts = P.source_texts(source, lambda doc_id: True, max_bytes=30_000)
    assert 29_990 <= sum(len(t.encode()) for t in texts) <= 30_003  # the last text is cut at the bound
    assert texts[0] == small_docs[0].text and len(texts) < 10
