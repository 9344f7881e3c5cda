"""Batch integrity: a fingerprint taken where a batch is made, checked where it is used.

A training batch can change on its way to the model (a buffer reused while kernels still read it, a copy on the
wrong stream). The loader side adds ``batch["fingerprint"]``: three int64 numbers computed on the host from the
batch as produced. The consumer recomputes them on the device after the step has used the batch and compares,
accumulating any difference in a device tensor, so the check costs a few small kernels and no host sync per step.

The expected fingerprint must not travel the batch's own path: a buffer reused by a later copy is overwritten with
that whole later batch, fingerprint included, and would look intact. So it stays on the host until the consumer
copies it on its own stream (the prefetcher's ``host_keys``). A batch overwritten between the forward's read of the
inputs and the loss's read of the labels then no longer matches, because the check runs after both.

The three numbers: a position-weighted sum of ``input_ids`` and of ``labels`` (a row or token moved elsewhere
changes them), and how many positions have ``labels[:, t] != input_ids[:, t + 1]`` (inputs and labels that come
from different batches change it; document ends and padding make it non-zero by design, and it is compared, not
required to be zero).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

KEY = "fingerprint"
_MODULUS = 8191  # weights 1..8191: ids below 2**32 times this, over 2**20 tokens, stay far below 2**63
_weights: dict[tuple[int, torch.device], torch.Tensor] = {}

Batch = dict[str, torch.Tensor]


def _weight(numel: int, device: torch.device) -> torch.Tensor:
    key = (numel, device)
    if key not in _weights:
        _weights[key] = torch.arange(numel, device=device, dtype=torch.int64) % _MODULUS + 1
    return _weights[key]


def fingerprint(batch: Batch) -> torch.Tensor:
    """``[3]`` int64 on the batch's device: weighted sums of input ids and labels, and the misaligned count."""
    ids, labels = batch["input_ids"], batch["labels"]
    weight = _weight(ids.numel(), ids.device)
    ids64, labels64 = ids.reshape(-1).long(), labels.reshape(-1).long()
    misaligned = (labels[:, :-1] != ids[:, 1:]).sum()
    return torch.stack([(ids64 * weight).sum(), (labels64 * weight).sum(), misaligned.long()])


def changed(batch: Batch) -> torch.Tensor:
    """A 0-dim bool device tensor: does the batch differ from its fingerprint? (No host sync.)"""
    return (fingerprint(batch) != batch[KEY].to(batch["input_ids"].device, non_blocking=True)).any()


class Fingerprinted:
    """Wraps a loader: each batch gains its host-side fingerprint under :data:`KEY`. Position and resume are the
    wrapped loader's."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def __getattr__(self, name: str) -> Any:  # tokens_per_batch, batch_size, state_dict, ...
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        batch = dict(next(self.loader))
        batch[KEY] = fingerprint(batch)
        return batch
