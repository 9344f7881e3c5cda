"""Passkey retrieval: a random number hidden at a chosen depth in real filler text; the model must repeat it.

A prompt of exactly ``length`` tokens is ``filler[:p] + needle + filler[p:] + question``, where the needle says
the key twice (" The pass key is 48213. Remember it. 48213 is the pass key.") and the question ends with
" The pass key is". ``p`` is ``depth`` times the filler length: depth 0 puts the needle first, depth 1 right
before the question. The filler is a window of held-out text (the validation documents), at a random offset.
The model decodes greedily; a trial is correct when the first run of digits it writes is exactly the key.
Keys and filler offsets come from ``seed`` (and the length, depth and trial), so a run is deterministic.
"""

from __future__ import annotations

import contextlib
import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tttexp.errors import ConfigError

NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = " What is the pass key? The pass key is"


@dataclass
class PasskeyConfig:
    """Passkey retrieval (the ``passkey`` section); lengths are prompt tokens, depths fractions of the filler."""

    enabled: bool = False  # run at the end of training (python -m tttexp.eval runs it too when true)
    lengths: list[int] = field(default_factory=lambda: [256, 512])  # prompt lengths in tokens
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])  # needle depth in [0, 1]
    trials: int = 4  # prompts per (length, depth), each with its own key and filler; run as one batch
    digits: int = 5  # digits of the key (chance of an exact match: 10^-digits)
    seed: int = 0  # keys and filler offsets

    def __post_init__(self) -> None:
        if not self.lengths or not self.depths:
            raise ConfigError("passkey.lengths and passkey.depths must each list at least one value")
        bad = [d for d in self.depths if not 0.0 <= float(d) <= 1.0]
        if bad:
            raise ConfigError(f"passkey.depths={list(self.depths)}: every depth must be in [0, 1] (0: start, 1: end), "
                              f"got {bad[0]}")
        if any(int(n) < 64 for n in self.lengths):
            raise ConfigError(f"passkey.lengths={list(self.lengths)}: every length must be >= 64 tokens (needle and "
                              "question)")
        if self.trials <= 0:
            raise ConfigError(f"passkey.trials={self.trials} must be > 0")
        if not 1 <= self.digits <= 12:
            raise ConfigError(f"passkey.digits={self.digits} must be between 1 and 12")


@dataclass
class PasskeyResult:
    """One row per (length, depth): ``length``, ``depth``, ``trials``, ``correct``, ``accuracy``."""

    rows: list[dict[str, Any]]
    samples: list[dict[str, Any]] = field(default_factory=list)  # per trial: key, the decoded answer, correct

    @property
    def accuracy(self) -> float:
        trials = sum(r["trials"] for r in self.rows)
        return sum(r["correct"] for r in self.rows) / trials if trials else float("nan")

    def by_length(self) -> dict[int, float]:
        out: dict[int, list[int]] = {}
        for r in self.rows:
            acc = out.setdefault(r["length"], [0, 0])
            acc[0] += r["correct"]
            acc[1] += r["trials"]
        return {length: c / t for length, (c, t) in out.items()}

    def write_csv(self, path: Path) -> Path:
        with Path(path).open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["length", "depth", "trials", "correct", "accuracy"])
            writer.writeheader()
            writer.writerows(self.rows)
        return Path(path)


def build_prompts(
    tokenizer: Any, filler: np.ndarray, length: int, depth: float, trials: int, digits: int, seed: int,
    depth_index: int = 0,
) -> tuple[torch.Tensor, list[str]]:
    """``trials`` prompts of exactly ``length`` tokens (int64 ``[trials, length]``) and their keys."""
    rows, keys = [], []
    question = tokenizer.encode(QUESTION)
    for trial in range(trials):
        rng = np.random.default_rng([seed, length, depth_index, trial])
        key = str(int(rng.integers(10 ** (digits - 1), 10**digits)))
        needle = tokenizer.encode(NEEDLE.format(key=key))
        room = length - len(needle) - len(question)
        if room < 0:
            raise ValueError(f"passkey length {length} is shorter than the needle and question "
                             f"({len(needle) + len(question)} tokens); raise passkey.lengths")
        if len(filler) < room:
            raise ValueError(f"the filler text has {len(filler)} tokens, fewer than the {room} that a passkey "
                             f"prompt of {length} tokens needs; lower passkey.lengths")
        start = int(rng.integers(0, len(filler) - room + 1))
        window = np.asarray(filler[start : start + room], dtype=np.int64)
        cut = int(round(depth * room))
        rows.append(np.concatenate([window[:cut], needle, window[cut:], question]).astype(np.int64))
        keys.append(key)
    return torch.from_numpy(np.stack(rows)), keys


@torch.no_grad()
def greedy(model: Any, ids: torch.Tensor, new_tokens: int,
           autocast: contextlib.AbstractContextManager | None = None, context: Any | None = None) -> torch.Tensor:
    """Greedy continuation ``[B, new_tokens]``: one prefill, then one token at a time through the model's cache.
    With ``context`` (a ``distributed.context.ContextParallel``; every rank of its group calls this with the same
    ids) most of the prompt is prefilled split over the group (:func:`split_prefill`)."""
    with autocast or contextlib.nullcontext():
        cache = None
        if context is not None:
            cache, ids = split_prefill(model, ids, context)
        out = model(ids, cache=cache, use_cache=True)
        cache = out.cache
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        generated = [token]
        for _ in range(new_tokens - 1):
            out = model(token, cache=cache, use_cache=True)
            cache = out.cache
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            generated.append(token)
    return torch.cat(generated, dim=1)


def split_prefill(model: Any, ids: torch.Tensor, context: Any) -> tuple[Any, torch.Tensor]:
    """Prefill the longest prefix of ``ids`` that splits into whole mini-batches over the context group (at least
    one token is left), each rank its slice, as in training; then make the cache whole (every head on every rank).
    Returns the cache (None when no prefix splits) and the tokens still to run, which every rank runs whole."""
    from tttexp.models import TTTCache

    config = model.config
    step = context.size * config.mini_batch_size
    n = (ids.shape[1] - 1) // step * step
    if n == 0:
        return None, ids
    part = n // context.size
    cache = TTTCache(config.num_hidden_layers)
    with context.split_evaluation():
        model(ids[:, context.rank * part : (context.rank + 1) * part], cache=cache, use_cache=True)
    context.gather_heads(cache)
    return cache, ids[:, n:]


def answer(text: str) -> str:
    """The first run of digits in ``text`` ("" when there is none): what the model said the key is."""
    match = re.search(r"\d+", text)
    return match.group(0) if match else ""


def run_passkey(
    model: Any, tokenizer: Any, filler: np.ndarray, cfg: PasskeyConfig,
    autocast: contextlib.AbstractContextManager | None = None, context: Any | None = None,
) -> PasskeyResult:
    """Accuracy by (length, depth) with exact-match scoring of the generated digits (``cfg`` checked itself;
    ``context``: the prompts are prefilled split over its group; see :func:`greedy`)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows, samples = [], []
    try:
        for length in cfg.lengths:
            for d, depth in enumerate(cfg.depths):
                ids, keys = build_prompts(tokenizer, filler, int(length), float(depth), cfg.trials, cfg.digits,
                                          cfg.seed, depth_index=d)
                out = greedy(model, ids.to(device), cfg.digits + 4, autocast, context)
                correct = 0
                for key, row in zip(keys, out.tolist(), strict=True):
                    said = answer(tokenizer.decode(row))
                    correct += said == key
                    samples.append({"length": int(length), "depth": float(depth), "key": key, "answer": said})
                rows.append({"length": int(length), "depth": float(depth), "trials": cfg.trials,
                             "correct": correct, "accuracy": correct / cfg.trials})
    finally:
        model.train(was_training)
    return PasskeyResult(rows=rows, samples=samples)


def filler_tokens(docs_tokens: Sequence[np.ndarray]) -> np.ndarray:
    """Held-out documents joined into one stream of real text (no separators)."""
    if not docs_tokens:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.asarray(d, dtype=np.int64) for d in docs_tokens])
