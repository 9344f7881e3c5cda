"""The maths of the schedule and the throughput figures."""

import math

import pytest

from tttexp.training import metrics as M
from tttexp.training.schedule import lr_at


def test_lr_warmup_then_cosine_to_floor():
    lrs = [lr_at(s, peak=1.0, warmup_steps=10, max_steps=110, min_ratio=0.1) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, peak=1.0, warmup_steps=10, max_steps=110, min_ratio=0.1) == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert min(lrs) >= 0.1 - 1e-12


def test_lr_without_warmup_starts_at_peak():
    assert lr_at(0, peak=3e-3, warmup_steps=0, max_steps=100, min_ratio=0.0) == pytest.approx(3e-3)


def test_tokens_per_second():
    assert M.tokens_per_second(1000, 0.5) == 2000
    assert M.tokens_per_second(1000, 0.0) == 0.0


def test_flops_and_mfu():
    ttt = M.ttt_flops_per_token(768, 12, 12, 16, "linear")
    f = 64
    assert ttt == pytest.approx(12 * 12 * 2 * (3 * f * f + 16 * f))
    per_token = M.train_flops_per_token(125_000_000, ttt)
    assert per_token == pytest.approx(6 * 125e6 + 3 * ttt)
    assert M.mfu(10_000, per_token, 1e15) == pytest.approx(10_000 * per_token / 1e15)
    assert M.mfu(10_000, per_token, None) is None
    assert M.ttt_flops_per_token(768, 12, 12, 16, "mlp") > ttt


def test_mixer_flops_count_attention_by_context_and_ttt_by_mini_batch():
    ttt_layer = M.ttt_flops_per_token(768, 12, 1, 16, "linear")
    attention_layer = 2.0 * 2048 * 768  # QK^T and AV: 2 * 2 * 768 per earlier position, 1024 of them on average
    hybrid = M.mixer_flops_per_token(["ttt", "attention", "ttt"], 768, 12, 16, "linear", seq_len=2048)
    assert hybrid == pytest.approx(2 * ttt_layer + attention_layer)
    assert M.mixer_flops_per_token(["ttt"] * 12, 768, 12, 16, "linear", 2048) == pytest.approx(
        M.ttt_flops_per_token(768, 12, 12, 16, "linear"))
    # attention's cost grows with the context, TTT's does not
    assert M.mixer_flops_per_token(["attention"], 768, 12, 16, "linear", 8192) == pytest.approx(4 * attention_layer)
