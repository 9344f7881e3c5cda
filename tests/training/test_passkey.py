"""Passkey retrieval: a model that copies scores 100 %, a random model scores ~0 (chance is 10^-5), the prompts are
deterministic, and the CSV and heatmap are written. Real text and a real BPE tokenizer throughout."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from tttexp.app import preflight
from tttexp.data import build_tokenizer, load_documents, tokenize_documents
from tttexp.errors import ConfigError
from tttexp.models import build_model
from tttexp.training.passkey import (
    NEEDLE,
    PasskeyConfig,
    build_prompts,
    filler_tokens,
    run_passkey,
)
from tttexp.training.plots import plot_passkey


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory):
    """A BPE trained on every 20th speech, and the tokens of a few others as the filler."""
    docs = load_documents("shipped")
    cache = tmp_path_factory.mktemp("passkey-cache")
    tokenizer = build_tokenizer("bpe", train_texts=[d.text for d in docs[::20]], vocab_size=512, cache_dir=cache)
    filler = filler_tokens(tokenize_documents(docs[5:40:7], tokenizer, cache))
    return tokenizer, filler


class CopyOracle(nn.Module):
    """A model that copies (test-only): it predicts the token that followed the latest earlier occurrence of the
    longest suffix of what it has read (an induction head). It keeps its history as its "cache"."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.anchor = nn.Parameter(torch.zeros(1))  # so that the evaluator finds a device

    def forward(self, input_ids: torch.Tensor, cache=None, use_cache=None, **_):
        history = input_ids if cache is None else torch.cat([cache, input_ids], dim=1)
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for b, row in enumerate(history.tolist()):
            logits[b, -1, self._next(row)] = 1.0
        return SimpleNamespace(logits=logits, cache=history)

    @staticmethod
    def _next(row: list[int]) -> int:
        for n in range(12, 0, -1):
            suffix = row[-n:]
            for start in range(len(row) - n - 1, -1, -1):
                if row[start : start + n] == suffix:
                    return row[start + n]
        return 0


def test_a_model_that_copies_scores_100_percent(text) -> None:
    tokenizer, filler = text
    cfg = PasskeyConfig(enabled=True, lengths=[96, 200], depths=[0.0, 0.5, 1.0], trials=3, seed=7)
    result = run_passkey(CopyOracle(tokenizer.vocab_size), tokenizer, filler, cfg)
    assert result.accuracy == 1.0
    assert [(r["length"], r["depth"]) for r in result.rows] == [(n, d) for n in (96, 200) for d in (0.0, 0.5, 1.0)]
    assert all(s["answer"] == s["key"] and len(s["key"]) == 5 for s in result.samples)


def test_a_random_model_scores_near_chance(text) -> None:
    """An untrained TTT model through its real cached decoding: exact matches of 5 digits essentially never."""
    tokenizer, filler = text
    torch.manual_seed(0)
    model = build_model(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64)
    cfg = PasskeyConfig(enabled=True, lengths=[96], depths=[0.0, 1.0], trials=4)
    result = run_passkey(model, tokenizer, filler, cfg)
    assert result.accuracy <= 0.05
    assert len(result.samples) == 8


def test_prompts_are_deterministic_exact_length_and_needle_at_depth(text) -> None:
    tokenizer, filler = text
    a, keys_a = build_prompts(tokenizer, filler, 150, 0.0, trials=3, digits=5, seed=1)
    b, keys_b = build_prompts(tokenizer, filler, 150, 0.0, trials=3, digits=5, seed=1)
    _, keys_c = build_prompts(tokenizer, filler, 150, 0.0, trials=3, digits=5, seed=2)
    assert torch.equal(a, b) and keys_a == keys_b and keys_a != keys_c
    assert a.shape == (3, 150)
    needle = tokenizer.encode(NEEDLE.format(key=keys_a[0]))
    assert a[0, : len(needle)].tolist() == needle  # depth 0: the needle comes first
    late, keys = build_prompts(tokenizer, filler, 150, 1.0, trials=1, digits=5, seed=1)
    text_late = tokenizer.decode(late[0].tolist())
    assert " ".join(text_late.split()).endswith(f"{keys[0]} is the pass key. What is the pass key? The pass key is")


def test_csv_and_heatmap_are_written(text, tmp_path: Path) -> None:
    tokenizer, filler = text
    cfg = PasskeyConfig(enabled=True, lengths=[96, 128], depths=[0.0, 1.0], trials=2)
    result = run_passkey(CopyOracle(tokenizer.vocab_size), tokenizer, filler, cfg)
    rows = list(csv.DictReader(result.write_csv(tmp_path / "passkey.csv").open()))
    assert [r["accuracy"] for r in rows] == ["1.0"] * 4 and rows[0].keys() >= {"length", "depth", "trials"}
    png = plot_passkey(result.rows, tmp_path / "passkey.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_settings_get_one_line_before_training() -> None:
    with pytest.raises(ConfigError, match=r"passkey.depths=\[0.5, 1.5\]: every depth must be in \[0, 1\]"):
        PasskeyConfig(depths=[0.5, 1.5])
    line = preflight.check(["experiment=smoke", "passkey.enabled=true", "passkey.depths=[0.0,1.2]"])
    assert line is not None and "passkey.depths" in line and "[0, 1]" in line and "\n" not in line
    line = preflight.check(["experiment=smoke", "passkey.lengths=[32]"])
    assert line is not None and "passkey.lengths" in line
