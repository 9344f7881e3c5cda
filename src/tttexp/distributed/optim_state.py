"""The optimizer's state keyed by parameter index (``optimizer.state_dict()``, the ``.pt`` format) or by
parameter name (``torch.distributed.checkpoint.state_dict``, the sharded format), and the conversion between them.

Indices follow the order of ``optimizer.param_groups``; names come from ``model.named_parameters()``. Both are
the same in every run of the same model, whatever wraps it, so a state converts losslessly either way.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each optimizer parameter, in index order."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def optimizer_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict:
    """An index-keyed state (``optimizer.state_dict()``) keyed by parameter name instead."""
    names = parameter_names(model, optimizer)
    return {
        "state": {names[int(i)]: value for i, value in state["state"].items()},
        "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]],
    }


def optimizer_state_by_index(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict:
    """A name-keyed state (``get_optimizer_state_dict``) keyed by index, as ``optimizer.state_dict()`` is."""
    index = {name: i for i, name in enumerate(parameter_names(model, optimizer))}
    return {
        "state": {index[name]: value for name, value in state["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]],
    }
