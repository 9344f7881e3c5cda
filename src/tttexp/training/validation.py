"""Validation: mean loss, and loss by token position over long sequences (TTT's claim: it keeps falling)."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F

from tttexp.models import TTTForCausalLM


def _split(context: Any | None) -> contextlib.AbstractContextManager:
    return context.split_evaluation() if context is not None else contextlib.nullcontext()


@torch.no_grad()
def mean_loss(
    model: TTTForCausalLM,
    batches,
    autocast: contextlib.AbstractContextManager | None = None,
    context: Any | None = None,
) -> tuple[float, int]:
    """Token-weighted mean loss over ``batches`` (dicts with ``input_ids`` and aligned ``labels``); returns the
    summed loss and the token count so that callers can combine processes. With ``context`` (a
    ``distributed.context.ContextParallel``) each sequence is split over its group as in training, and the sums are
    this rank's slice's: the group's sums together are the whole sequences'."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
            if context is not None:
                part = context.local_batch({"input_ids": ids, "labels": labels})
                ids, labels = part["input_ids"], part["labels"]
            with autocast or contextlib.nullcontext(), _split(context):
                logits = model(ids, use_cache=False).logits
            total += float(F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                           reduction="sum"))
            count += int((labels != -100).sum())
    finally:
        model.train(was_training)
    return total, count


def mean_loss_all(model: TTTForCausalLM, batches, layout: Any) -> float:
    """:func:`mean_loss` token-weighted over all processes of ``layout`` (split over its context group, if any)."""
    total, count = mean_loss(model, batches, autocast=layout.autocast(), context=layout.context)
    sums = layout.all_reduce_mean(torch.tensor([total, float(count)], dtype=torch.float64, device=layout.device))
    return float(sums[0] / sums[1].clamp_min(1))


@torch.no_grad()
def loss_by_position(
    model: TTTForCausalLM,
    sequences: torch.Tensor,
    buckets: int = 16,
    batch_size: int = 4,
    autocast: contextlib.AbstractContextManager | None = None,
    context: Any | None = None,
) -> list[dict[str, float]]:
    """Per-token loss of ``sequences [N, L+1]`` (inputs ``[:, :-1]``, targets ``[:, 1:]``) averaged over the
    sequences, then over ``buckets`` equal spans of positions. Rows: ``start``, ``end``, ``loss``, ``ppl``.

    With ``context`` (a ``distributed.context.ContextParallel``; every rank of its group calls this with the same
    sequences) each rank computes its slice of the ``L`` positions, as in training, so the evaluation holds
    ``L / cp`` positions' activations per rank; the group adds its slices up."""
    device = next(model.parameters()).device
    length = sequences.shape[1] - 1
    part, first = length, 0
    if context is not None:
        if length % context.size:
            raise ValueError(f"loss by position over {length} tokens cannot be split over context_parallel="
                             f"{context.size}")
        part = length // context.size
        first = context.rank * part
    was_training = model.training
    model.eval()
    total = torch.zeros(length, dtype=torch.float64, device=device)
    try:
        for i in range(0, sequences.shape[0], batch_size):
            chunk = sequences[i : i + batch_size, first : first + part + 1].to(device)
            with autocast or contextlib.nullcontext(), _split(context):
                logits = model(chunk[:, :-1], use_cache=False).logits
            losses = F.cross_entropy(logits.float().transpose(1, 2), chunk[:, 1:], reduction="none")
            total[first : first + part] += losses.double().sum(0)
    finally:
        model.train(was_training)
    if context is not None:
        total = context.sum_over_group(total)
    per_position = (total / sequences.shape[0]).cpu()
    length = per_position.shape[0]
    edges = [round(length * b / buckets) for b in range(buckets + 1)]
    rows = []
    for start, end in zip(edges[:-1], edges[1:], strict=True):
        if end > start:
            loss = float(per_position[start:end].mean())
            rows.append({"start": start, "end": end, "loss": loss, "ppl": math.exp(min(loss, 50.0))})
    return rows
