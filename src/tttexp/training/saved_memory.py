"""Activation memory of a training forward: the bytes autograd keeps for the backward."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def saved_activation_bytes(model: torch.nn.Module, forward: Callable[[], Any]) -> int:
    """Bytes of the distinct storages that ``forward()`` saves for the backward, the parameters of ``model`` (and
    views of them) left out: what a training step holds at its peak besides weights, gradients and optimizer state.
    Returns after ``forward()``; what it returned is dropped."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}
    held = []  # every storage seen stays alive until the end, so no address is reused for another

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        held.append(storage)
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = forward()
    del result
    return sum(saved.values())
