from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest

from tttexp.data import Document, Tokenizer, build_tokenizer
from tttexp.data.tokenizer import EOS_TOKEN


def test_bpe_round_trips_unseen_text(bpe: Tokenizer, shipped_docs: list[Document]) -> None:
    unseen = shipped_docs[5].text  # the fixture trains on every tenth speech only
    ids = bpe.encode(unseen)
    assert bpe.decode(ids) == unseen
    assert 2 < len(unseen) / len(ids) < 6  # characters per token of a 512-entry BPE on English
    assert bpe.vocab_size == 512 and max(ids) < 512  # the fixture's size
    assert bpe.decode([bpe.eos_id]) == EOS_TOKEN and bpe.eos_id not in ids
    assert bpe.encode_batch([unseen, "Fellow-Citizens"]) == [ids, bpe.encode("Fellow-Citizens")]


def test_bpe_is_trained_once_then_loaded(
    tmp_path: Path, small_docs: list[Document], caplog: pytest.LogCaptureFixture
) -> None:
    texts = [d.text for d in small_docs[:4]]
    with caplog.at_level(logging.INFO, logger="tttexp.data.tokenizer"):
        first = build_tokenizer("bpe", train_texts=texts, vocab_size=300, cache_dir=tmp_path)
        files = list((tmp_path / "tokenizers").iterdir())
        assert [f.name for f in files] == [f"{first.name}.json"]
        stamp = files[0].stat().st_mtime_ns
        caplog.clear()
        second = build_tokenizer("bpe", train_texts=texts, vocab_size=300, cache_dir=tmp_path)
    assert [r.getMessage().split()[0] for r in caplog.records] == ["loading"]
    assert files[0].stat().st_mtime_ns == stamp
    assert second.name == first.name and second.source == first.source
    assert second.encode(texts[0]) == first.encode(texts[0])

    other = build_tokenizer("bpe", train_texts=texts, vocab_size=320, cache_dir=tmp_path)
    assert other.name != first.name and other.vocab_size == 320
    assert len(list((tmp_path / "tokenizers").iterdir())) == 2  # no temporary files left behind


def test_cached_bpe_file_loads_by_path(bpe: Tokenizer, small_docs: list[Document], tmp_path: Path) -> None:
    again = build_tokenizer(bpe.source, train_texts=None, vocab_size=0, cache_dir=tmp_path)
    text = small_docs[1].text
    assert again.encode(text) == bpe.encode(text) and again.eos_id == bpe.eos_id


def test_sentencepiece_model_file(tmp_path: Path, small_docs: list[Document]) -> None:
    import sentencepiece

    prefix = tmp_path / "speeches"
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([d.text for d in small_docs]),
        model_prefix=str(prefix),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        max_sentence_length=1 << 20,
        minloglevel=2,
    )
    tok = build_tokenizer(f"{prefix}.model", train_texts=None, vocab_size=0, cache_dir=tmp_path)
    text = small_docs[2].text[:2000]
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == 400 and tok.eos_id == 2 and tok.name.startswith("spm-")


@pytest.mark.skipif(importlib.util.find_spec("mistral_common") is None, reason="mistral-common not installed")
def test_shipped_sentencepiece_is_the_32k_model(tmp_path: Path) -> None:
    tok = build_tokenizer("sentencepiece", train_texts=None, vocab_size=0, cache_dir=tmp_path)
    assert Path(tok.source).name == "tokenizer.model.v1"
    assert tok.vocab_size == 32000 and tok.eos_id == 2
    text = "Fellow-Citizens of the Senate and House of Representatives:"
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.skipif(
    importlib.util.find_spec("mistral_common") is not None, reason="mistral-common is installed"
)
def test_sentencepiece_without_mistral_common_says_how_to_install(tmp_path: Path, one_line) -> None:
    with pytest.raises(ValueError) as excinfo:
        build_tokenizer("sentencepiece", train_texts=None, vocab_size=0, cache_dir=tmp_path)
    assert "pip install --no-deps mistral-common" in one_line(excinfo)


def test_transformers_tokenizer_directory(bpe: Tokenizer, small_docs: list[Document], tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_file=bpe.source, eos_token=EOS_TOKEN).save_pretrained(tmp_path / "tok")
    tok = build_tokenizer(str(tmp_path / "tok"), train_texts=None, vocab_size=0, cache_dir=tmp_path)
    text = small_docs[3].text
    assert tok.encode(text) == bpe.encode(text)
    assert tok.decode(tok.encode(text)) == text
    assert tok.eos_id == bpe.eos_id and tok.vocab_size == bpe.vocab_size and tok.name.startswith("hf-")


def test_unknown_tokenizer_fails_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_line) -> None:
    monkeypatch.delenv("TTTEXP_ALLOW_DOWNLOAD", raising=False)
    with pytest.raises(ValueError) as excinfo:
        build_tokenizer("no-such-org/no-such-tokenizer", train_texts=None, vocab_size=0, cache_dir=tmp_path)
    assert "TTTEXP_ALLOW_DOWNLOAD" in one_line(excinfo)


def test_tokenizer_argument_errors(tmp_path: Path, one_line) -> None:
    with pytest.raises(ValueError) as excinfo:
        build_tokenizer(str(tmp_path / "missing.model"), train_texts=None, vocab_size=0, cache_dir=tmp_path)
    assert "missing.model" in one_line(excinfo)
    with pytest.raises(ValueError) as excinfo:
        build_tokenizer("bpe", train_texts=None, vocab_size=512, cache_dir=tmp_path)
    assert "train_texts" in one_line(excinfo)
    with pytest.raises(ValueError) as excinfo:
        build_tokenizer("bpe", train_texts=["some text"], vocab_size=100, cache_dir=tmp_path)
    assert "vocab_size" in one_line(excinfo)
