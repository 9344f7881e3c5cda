"""Perplexity by position beyond the training length, and the memory check that keeps it from crashing a run.

Held-out documents long enough for ``factor`` times the training context are read from their first token; the
per-token loss is averaged over the documents and reported per position bucket. When no held-out document is
that long, the longest multiple of the training context that one is reaches is used instead (and said in the
result), so "up to 4x" never silently becomes nothing.
"""

from __future__ import annotations

import contextlib
import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tttexp.loggers import catalogue as C
from tttexp.training.validation import loss_by_position

BYTES = 4  # fp32 activations


@dataclass
class LongContextResult:
    """Loss by position over ``sequences`` held-out documents of ``length`` tokens (training context
    ``train_len``): one row per bucket with ``start``, ``end``, ``loss``, ``ppl``."""

    rows: list[dict[str, float]]
    length: int
    train_len: int
    sequences: int

    def late_ppl(self) -> float:
        """Perplexity over the last quarter of the positions (beyond the training length when length >= 4/3 x)."""
        start = 0.75 * self.length
        late = [r for r in self.rows if r["start"] >= start] or self.rows[-1:]
        if not late:
            return float("nan")
        span = sum(r["end"] - r["start"] for r in late)
        loss = sum(r["loss"] * (r["end"] - r["start"]) for r in late) / span
        return math.exp(min(loss, 50.0))

    def within_train_ppl(self) -> float:
        """Perplexity over positions inside the training context."""
        inside = [r for r in self.rows if r["end"] <= self.train_len]
        if not inside:
            return float("nan")
        span = sum(r["end"] - r["start"] for r in inside)
        return math.exp(min(sum(r["loss"] * (r["end"] - r["start"]) for r in inside) / span, 50.0))

    def table(self) -> tuple[list[str], list[list[float]]]:
        return ["start", "end", "loss", "ppl"], [[r["start"], r["end"], r["loss"], r["ppl"]] for r in self.rows]

    def write_csv(self, path: Path) -> Path:
        with Path(path).open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["start", "end", "loss", "ppl", "beyond_train_len"])
            for r in self.rows:
                writer.writerow([r["start"], r["end"], r["loss"], r["ppl"], int(r["start"] >= self.train_len)])
        return Path(path)


def eval_length(val_set: Any, train_len: int, factor: int = 4, requested: int = 0) -> int | None:
    """``requested`` when given, else the largest of ``factor``, ``factor``-1, ... x ``train_len`` that a held-out
    document reaches; None when not even one training context fits."""
    if requested:
        return requested
    for mult in range(factor, 0, -1):
        try:
            val_set.long_sequences(mult * train_len, 1)
            return mult * train_len
        except ValueError:
            continue
    return None


def perplexity_by_position(
    model: Any, val_set: Any, train_len: int, *, factor: int = 4, length: int = 0, sequences: int = 8,
    buckets: int = 16, batch_size: int = 4, autocast: contextlib.AbstractContextManager | None = None,
    context: Any | None = None,
) -> LongContextResult | None:
    """Loss by position up to ``factor`` x ``train_len`` (or exactly ``length``); None without a long document.
    ``context``: each sequence split over that context group (:func:`tttexp.training.validation.loss_by_position`)."""
    chosen = eval_length(val_set, train_len, factor, length)
    if chosen is None:
        return None
    try:
        seqs = val_set.long_sequences(chosen, sequences)
    except ValueError:
        return None
    rows = loss_by_position(model, seqs, buckets=buckets, batch_size=batch_size, autocast=autocast, context=context)
    return LongContextResult(rows=rows, length=chosen, train_len=train_len, sequences=int(seqs.shape[0]))


# --------------------------------------------------------------------------------------------------------------
# Will it fit? A rough upper bound of an evaluation forward, checked before training starts.
# --------------------------------------------------------------------------------------------------------------


def eval_bytes(*, batch: int, length: int, hidden: int, vocab: int, heads: int) -> int:
    """Peak bytes of one no-grad forward of ``batch`` x ``length`` tokens: the logits, their fp32 copy and the
    log-softmax of the loss, and a few live hidden states (SDPA's fused causal kernels keep no score matrix; the
    TTT state is per head, independent of the length)."""
    logits = 3 * batch * length * vocab
    hidden_states = 12 * batch * length * hidden + 4 * batch * heads * length
    return BYTES * (logits + hidden_states)


def available_bytes(device: str = "auto") -> int:
    """Memory the evaluation may use: free GPU memory on CUDA, else the machine's physical memory."""
    import os

    import torch

    if device in ("auto", "cuda") and torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info()
        return int(free)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 1 << 40


def check_fits(*, what: str, batch: int, length: int, hidden: int, vocab: int, heads: int,
               device: str = "auto", limit: int | None = None) -> str | None:
    """The one-line reason an evaluation of ``length`` tokens at ``batch`` would not fit in memory, or None."""
    need = eval_bytes(batch=batch, length=length, hidden=hidden, vocab=vocab, heads=heads)
    have = available_bytes(device) if limit is None else limit
    if need > 0.8 * have:
        return (f"{what}: {length} tokens x batch {batch} needs about {need / 2**30:.1f} GiB, more than the "
                f"{have / 2**30:.1f} GiB here; lower the length or the batch")
    return None


# --------------------------------------------------------------------------------------------------------------
# The end-of-run reports: what the trainer (and the eval app) write into a run directory.
# --------------------------------------------------------------------------------------------------------------


def held_out_documents(val_set: Any) -> list:
    """The tokenized validation documents behind a validation set (the passkey filler)."""
    return list(getattr(val_set, "documents", None) or getattr(val_set, "_docs", []))


def context_reports(
    model: Any, data: Any, out_dir: Path, logger: Any, step: int, *, factor: int = 4, length: int = 0,
    sequences: int = 8, passkey: Any | None = None, autocast: contextlib.AbstractContextManager | None = None,
    plots: bool = True, write: bool = True, batch_size: int = 4, context: Any | None = None,
) -> tuple[list[dict[str, float]], dict[str, float]]:
    """Perplexity by position (``ppl_by_position.csv`` / ``.png``, table ``val/ppl_by_position``) and, when
    ``passkey.enabled``, passkey retrieval (``passkey.csv`` / ``passkey.png``, table ``val/passkey``). With
    ``context`` (a ``distributed.context.ContextParallel``) both run each sequence split over its group.

    Returns the position rows and the summary values (``summary/ppl_late``, ``summary/passkey_accuracy``, ...).
    """
    from tttexp.training import plots as P
    from tttexp.training.passkey import filler_tokens, run_passkey

    out_dir = Path(out_dir)
    extras: dict[str, float] = {}
    rows: list[dict[str, float]] = []
    train_len = int(getattr(data, "seq_len", 0) or 256)
    result = None
    if sequences > 0:
        result = perplexity_by_position(model, data.val_set, train_len, factor=factor, length=length,
                                        sequences=sequences, batch_size=batch_size, autocast=autocast,
                                        context=context)
    if result is not None:
        rows = result.rows
        logger.log_table(C.VAL_PPL_BY_POSITION, *result.table(), step=step)
        extras.update({C.SUMMARY_PPL_LATE: result.late_ppl(), C.SUMMARY_PPL_WITHIN_TRAIN: result.within_train_ppl(),
                       C.SUMMARY_POSITION_EVAL_LEN: result.length})
        if write:
            result.write_csv(out_dir / "ppl_by_position.csv")
        if plots:
            title = (f"validation perplexity by position ({result.sequences} held-out documents; "
                     f"trained at {train_len})")
            png = P.plot_by_position(rows, out_dir / "ppl_by_position.png", title=title, train_len=train_len)
            if png is not None:
                logger.log_image(C.PLOTS_PPL_BY_POSITION, png, step=step)
    if passkey is not None and passkey.enabled:
        filler = filler_tokens(held_out_documents(data.val_set))
        found = run_passkey(model, data.tokenizer, filler, passkey, autocast=autocast, context=context)
        logger.log_table(C.VAL_PASSKEY, ["length", "depth", "trials", "correct", "accuracy"],
                         [[r[c] for c in ("length", "depth", "trials", "correct", "accuracy")] for r in found.rows],
                         step=step)
        if write:
            found.write_csv(out_dir / "passkey.csv")
        extras[C.SUMMARY_PASSKEY_ACCURACY] = found.accuracy
        if plots:
            png = P.plot_passkey(found.rows, out_dir / "passkey.png")
            if png is not None:
                logger.log_image(C.PLOTS_PASSKEY, png, step=step)
    return rows, extras


def final_reports(model: Any, data: Any, run_dir: Path, logger: Any, step: int, loop: Any, passkey: Any | None,
                  autocast: contextlib.AbstractContextManager | None, main: bool,
                  context: Any | None = None) -> dict[str, float]:
    """The trainer's end of run: :func:`context_reports` with the ``trainer`` group's settings (``loop``), then the
    loss-curve plot. ``main``: this process writes files and plots; ``context``: sequences split over that context
    group. Returns the summary values."""
    _rows, extras = context_reports(
        model, data, run_dir, logger, step, length=loop.position_eval_len, sequences=loop.position_eval_sequences,
        passkey=passkey, autocast=autocast, plots=loop.plots and main, write=main,
        batch_size=data.train_loader.batch_size, context=context,
    )
    if loop.plots and main:
        from tttexp.training import plots

        metrics = run_dir / "metrics.jsonl"
        loss_png = plots.plot_losses(metrics, run_dir / "loss.png") if metrics.exists() else None
        if loss_png is not None:
            logger.log_image(C.PLOTS_LOSS, loss_png, step=step)
    return extras
