"""The learning-rate schedule: linear warmup, then a cosine to a floor."""

from __future__ import annotations

import math


def lr_at(step: int, *, peak: float, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Linear warmup from peak/warmup to peak over ``warmup_steps``, then a cosine to ``peak * min_ratio`` at
    ``max_steps``. ``step`` counts from 0 (the first update uses ``lr_at(0)``)."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    floor = peak * min_ratio
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))
