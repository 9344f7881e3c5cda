from __future__ import annotations

from pathlib import Path

import pytest

from tttexp.data import DataModule, StreamLoader, Tokenizer, WindowLoader, build_tokenizer, load_documents
from tttexp.data.corpus import split_documents


def _module(tmp_path: Path, **overrides) -> DataModule:
    args = dict(
        seq_len=64, batch_size=4, vocab_size=512, max_documents=30, val_windows=16, cache_dir=str(tmp_path)
    )
    return DataModule(**{**args, **overrides})


def test_setup_builds_tokenizer_on_train_split_and_loaders(tmp_path: Path) -> None:
    dm = _module(tmp_path)
    dm.setup()
    train, _ = split_documents(load_documents("shipped", max_documents=30), 0.05, seed=0)
    expected = build_tokenizer("bpe", train_texts=[d.text for d in train], vocab_size=512, cache_dir=tmp_path)
    assert dm.tokenizer.name == expected.name and dm.vocab_size == 512
    assert isinstance(dm.train_loader, WindowLoader)
    batch = next(dm.train_loader)
    assert batch["input_ids"].shape == (4, 64) and int(batch["input_ids"].max()) < dm.vocab_size
    assert 0 < len(dm.val_set) <= 16
    assert dm.num_train_tokens > 10 * dm.num_val_tokens > 0
    (corpus,) = (tmp_path / "prepared").iterdir()  # one prepared corpus: train and validation split at load time
    assert (corpus / "manifest.json").is_file() and list(corpus.glob("shard-*.bin"))


def test_stream_setup_with_a_given_tokenizer(tmp_path: Path, bpe: Tokenizer) -> None:
    dm = _module(tmp_path, seq_len=32, stream=True)
    dm.setup(rank=1, world_size=2, mini_batch_size=8, tokenizer=bpe)
    assert dm.tokenizer is bpe and not (tmp_path / "tokenizers").exists()
    assert isinstance(dm.train_loader, StreamLoader)
    batch = next(dm.train_loader)
    assert batch["doc_start"].shape == (4, 4) and bool(batch["doc_start"][:, 0].all())


def test_text_files_source(tmp_path: Path, small_docs) -> None:
    for doc in small_docs[:8]:
        (tmp_path / f"{doc.id}.txt").write_text(doc.text, encoding="utf-8")
    dm = _module(tmp_path / "cache", source="text_files", paths=[str(tmp_path / "*.txt")], val_fraction=0.2)
    dm.setup()
    assert dm.num_train_tokens + dm.num_val_tokens > 8 * 1000


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TTTEXP_CACHE_DIR", str(tmp_path))
    assert DataModule().cache_dir == tmp_path
    monkeypatch.delenv("TTTEXP_CACHE_DIR")
    assert DataModule().cache_dir == Path.home() / ".cache" / "tttexp"
    assert DataModule(cache_dir=str(tmp_path / "x")).cache_dir == tmp_path / "x"


def test_hydra_instantiates_it(tmp_path: Path) -> None:
    from hydra.utils import instantiate

    dm = instantiate({"_target_": "tttexp.data.DataModule", "seq_len": 128, "cache_dir": str(tmp_path)})
    assert isinstance(dm, DataModule) and dm.seq_len == 128


@pytest.mark.parametrize(
    ("overrides", "word"),
    [
        ({"seq_len": 0}, "seq_len"),
        ({"batch_size": -1}, "batch_size"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"source": "web"}, "source"),
        ({"source": "text_files"}, "paths"),
        ({"source": "hf"}, "hf_dataset"),
        ({"vocab_size": 200}, "vocab_size"),
        ({"prefetch_depth": 0}, "prefetch_depth"),
        ({"stream": True, "shuffle": False}, "data.shuffle=false"),
    ],
)
def test_bad_arguments_fail_early(overrides: dict, word: str, one_line) -> None:
    with pytest.raises(ValueError) as excinfo:
        DataModule(**overrides)
    assert word in one_line(excinfo)


def test_properties_need_setup(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="setup"):
        _ = _module(tmp_path).train_loader
