"""What the config dataclasses share: the one-line value checks their ``__post_init__`` runs, and the mark that
puts a field in the fingerprint a resume must match.

Hydra-free, like :mod:`tttexp.errors`: each layer (data, models, distributed, training) writes its own config
beside what it builds, and the app registers those classes as the schemas of its config groups.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, fields
from typing import Any

from tttexp.errors import ConfigError

# ``field(default=..., metadata=RESUME)``: the setting decides the math of a run, so a resume must match it
# (training/rundir.py compares the values; changing any other setting is allowed on resume).
RESUME = {"resume": True}

FLOAT32_MAX = 3.4028234663852886e38  # optimizer values live in float32 tensors


def resume_fields(schema: type) -> dict[str, Any]:
    """The fields of ``schema`` marked :data:`RESUME`, each with its default (what a config without the field
    runs with); nested dataclasses are not entered."""
    out: dict[str, Any] = {}
    for spec in fields(schema):
        if spec.metadata.get("resume"):
            default = spec.default_factory() if spec.default_factory is not MISSING else spec.default
            out[spec.name] = None if default is MISSING else default
    return out


def choice(path: str, value: Any, allowed: tuple) -> None:
    """``path=value`` must be one of ``allowed``."""
    if value not in allowed:
        raise ConfigError(f"{path}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")


def positive(path: str, value: Any, allow_zero: bool = False) -> None:
    """``path=value`` must be > 0 (>= 0 with ``allow_zero``)."""
    if value is None or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{path}={value!r} must be {bound}")


def float32(path: str, value: float) -> None:
    """``path=value`` must be a finite number that a float32 tensor holds."""
    if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
        raise ConfigError(f"{path}={value!r} is outside float32's range (up to {FLOAT32_MAX:.3g})")

