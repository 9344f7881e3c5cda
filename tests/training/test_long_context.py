"""Perplexity by position beyond the training length: up to 4x on held-out documents, per bucket, CSV and plot;
an evaluation that would not fit in memory is refused in one line before training."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from tttexp.app import preflight
from tttexp.data import build_tokenizer, load_documents, tokenize_documents
from tttexp.data.loaders import ValidationSet
from tttexp.models import build_model
from tttexp.training.long_context import check_fits, eval_length, perplexity_by_position
from tttexp.training.plots import plot_by_position


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory):
    docs = load_documents("shipped")
    cache = tmp_path_factory.mktemp("long-context-cache")
    tokenizer = build_tokenizer("bpe", train_texts=[d.text for d in docs[::20]], vocab_size=512, cache_dir=cache)
    tokens = tokenize_documents(docs[3:60:9], tokenizer, cache)
    return tokenizer, tokens


def test_by_position_reaches_four_times_the_training_length(held_out, tmp_path: Path) -> None:
    tokenizer, tokens = held_out
    val = ValidationSet(tokens, tokenizer.eos_id, seq_len=32, max_windows=4)
    torch.manual_seed(0)
    model = build_model(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, mixer="attention")
    result = perplexity_by_position(model, val, train_len=32, sequences=3, buckets=8)
    assert result is not None and result.length == 128 and result.sequences == 3
    assert [(r["start"], r["end"]) for r in result.rows] == [(16 * i, 16 * i + 16) for i in range(8)]
    late = np.exp(np.mean([r["loss"] for r in result.rows[6:]]))
    assert result.late_ppl() == pytest.approx(late, rel=1e-9)
    assert result.within_train_ppl() == pytest.approx(np.exp(np.mean([r["loss"] for r in result.rows[:2]])))
    rows = list(csv.DictReader(result.write_csv(tmp_path / "p.csv").open()))
    assert [r["beyond_train_len"] for r in rows] == ["0", "0"] + ["1"] * 6
    png = plot_by_position(result.rows, tmp_path / "p.png", train_len=32)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_falls_back_to_the_longest_multiple_a_document_reaches(held_out) -> None:
    tokenizer, tokens = held_out
    short = [t[:100] for t in tokens]  # every document 100 tokens: 4 x 32 does not fit, 3 x 32 = 96 does
    val = ValidationSet(short, tokenizer.eos_id, seq_len=32, max_windows=2)
    assert eval_length(val, 32) == 96
    assert eval_length(val, 64) == 64
    assert eval_length(val, 128) is None
    assert eval_length(val, 32, requested=50) == 50


def test_an_evaluation_too_long_for_memory_is_refused_in_one_line() -> None:
    line = check_fits(what="trainer.position_eval_len", batch=8, length=1 << 20, hidden=768, vocab=32000, heads=12,
                      limit=16 << 30)
    assert line is not None and "trainer.position_eval_len" in line and "GiB" in line
    assert check_fits(what="x", batch=2, length=8192, hidden=64, vocab=4096, heads=2, limit=16 << 30) is None
    line = preflight.check(["experiment=smoke", "trainer.position_eval_len=50000000"])
    assert line is not None and line.startswith("trainer.position_eval_len") and "\n" not in line
    line = preflight.check(["experiment=smoke", "passkey.enabled=true", "passkey.lengths=[64,900000000]"])
    assert line is not None and line.startswith("passkey.lengths")
