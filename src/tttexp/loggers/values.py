"""Conversion of logged values to plain JSON-compatible Python."""

from __future__ import annotations

from collections.abc import Mapping
from os import PathLike
from typing import Any


def to_plain(value: Any) -> Any:
    """Convert ``value`` to None/bool/int/float/str, lists and str-keyed dicts.

    Accepts what a trainer naturally hands over: 0-d tensors and numpy scalars (``.item()``), arrays
    (``.tolist()``), paths, OmegaConf containers (they are Mappings/Sequences). Anything else becomes ``str``.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(key): to_plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_plain(item) for item in value]
    if isinstance(value, PathLike):
        return str(value)
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "ndim", None) == 0:
        return to_plain(item())
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return to_plain(tolist())
    if hasattr(value, "__iter__") and hasattr(value, "__len__") and not isinstance(value, (bytes, bytearray)):
        return [to_plain(item) for item in value]
    return str(value)


def plain_dict(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """``to_plain`` of every value, keys as str."""
    return {str(key): to_plain(value) for key, value in mapping.items()}
