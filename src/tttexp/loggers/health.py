"""Training-health checks over the logged metrics, reported as first-class warnings.

``HealthMonitor.update`` looks at one record of metrics (catalogue names) and returns the warnings it
raises; ``counts`` gives ``warnings/<kind>`` for every kind so the trainer can log them as series. The
trainer prints each kind's message once and forwards it to ``Logger.alert``.

Spikes and drops are measured against the running median of the last ``window`` finite values (a median,
not a mean, so one bad step does not move the reference), and only after ``warmup`` training steps, with at
least ``min_reference`` values in the median (compilation, learning-rate warm-up and the steep start of the
loss curve would otherwise trip them). The warm-up counts steps, not records, so the checks start at the
same step whatever ``trainer.log_every`` is. State growth compares the newest state norm with the one logged
``state_window`` steps earlier. The defaults stay silent on an ordinary noisy curve.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tttexp.loggers import catalogue as cat

NONFINITE_LOSS = "nonfinite_loss"
NONFINITE_GRAD = "nonfinite_grad"
LOSS_SPIKE = "loss_spike"
GRAD_SPIKE = "grad_spike"
THROUGHPUT_DROP = "throughput_drop"
STATE_GROWTH = "state_growth"
KINDS = (NONFINITE_LOSS, NONFINITE_GRAD, LOSS_SPIKE, GRAD_SPIKE, THROUGHPUT_DROP, STATE_GROWTH)

_ADVICE = {
    NONFINITE_LOSS: "training has diverged or overflowed: lower the learning rate, check the precision "
    "(fp16 overflow), and resume from the last good checkpoint",
    NONFINITE_GRAD: "gradients overflowed: check the precision and loss scaling, lower the learning rate, "
    "or enable gradient clipping",
    LOSS_SPIKE: "a bad batch or an unstable update: if it does not recover, lower the learning rate or "
    "tighten gradient clipping",
    GRAD_SPIKE: "an unstable update: consider gradient clipping or a lower learning rate",
    THROUGHPUT_DROP: "look for contention (other jobs, data-loader stalls, thermal throttling, recompilation)",
    STATE_GROWTH: "the carried TTT state is growing: check the state reset policy and the TTT inner learning rate",
}


@dataclass(frozen=True)
class HealthWarning:
    """One detection: ``kind`` (one of ``KINDS``), the step, a message that says what to do, the value."""

    kind: str
    step: int
    message: str
    value: float | None = None


def _number(metrics: Mapping[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


class HealthMonitor:
    """Watches loss, gradient norm, throughput and the carried-state norm for signs of trouble."""

    def __init__(
        self,
        warmup: int = 20,
        window: int = 100,
        min_reference: int = 3,
        loss_spike_factor: float = 1.5,
        loss_spike_min_delta: float = 0.1,
        grad_spike_factor: float = 5.0,
        throughput_drop_fraction: float = 0.5,
        state_growth_factor: float = 4.0,
        state_window: int = 50,
    ) -> None:
        self.warmup = warmup  # training steps before any spike or drop is reported
        self.min_reference = max(1, min_reference)
        self.state_window = state_window  # steps over which the state norm may grow by state_growth_factor
        self.loss_spike_factor = loss_spike_factor
        self.loss_spike_min_delta = loss_spike_min_delta
        self.grad_spike_factor = grad_spike_factor
        self.throughput_drop_fraction = throughput_drop_fraction
        self.state_growth_factor = state_growth_factor
        self._loss: deque[float] = deque(maxlen=window)
        self._grad: deque[float] = deque(maxlen=window)
        self._throughput: deque[float] = deque(maxlen=window)
        self._state: deque[tuple[int, float]] = deque()
        self._counts = dict.fromkeys(KINDS, 0)

    def update(self, step: int, metrics: Mapping[str, Any]) -> list[HealthWarning]:
        """Check one record of metrics; returns the warnings it raises (usually none)."""
        found: list[HealthWarning] = []
        loss = _number(metrics, cat.TRAIN_LOSS)
        if loss is not None:
            found += self._check_loss(step, loss)
        grad = _number(metrics, cat.TRAIN_GRAD_NORM)
        if grad is not None:
            found += self._check_grad(step, grad)
        throughput = _number(metrics, cat.TRAIN_TOKENS_PER_SEC)
        if throughput is not None:
            found += self._check_throughput(step, throughput)
        w_norm = _number(metrics, cat.STATE_W_NORM)
        if w_norm is not None:
            found += self._check_state(step, w_norm)
        for warning in found:
            self._counts[warning.kind] += 1
        return found

    def counts(self) -> dict[str, int]:
        """``{"warnings/<kind>": n}`` for every kind, zeros included."""
        return {f"{cat.WARNINGS}{kind}": n for kind, n in self._counts.items()}

    def _check_loss(self, step: int, loss: float) -> list[HealthWarning]:
        if not math.isfinite(loss):
            return [_warning(NONFINITE_LOSS, step, loss, f"training loss is {loss} at step {step}")]
        found = []
        if self._ready(step, self._loss):
            median = statistics.median(self._loss)
            if loss > self.loss_spike_factor * median and loss - median > self.loss_spike_min_delta:
                text = f"loss spike at step {step}: {loss:.4g} against a running median of {median:.4g}"
                found.append(_warning(LOSS_SPIKE, step, loss, text))
        self._loss.append(loss)
        return found

    def _ready(self, step: int, reference: deque[float]) -> bool:
        return step > self.warmup and len(reference) >= self.min_reference

    def _check_grad(self, step: int, grad: float) -> list[HealthWarning]:
        if not math.isfinite(grad):
            return [_warning(NONFINITE_GRAD, step, grad, f"gradient norm is {grad} at step {step}")]
        found = []
        if self._ready(step, self._grad):
            median = statistics.median(self._grad)
            if grad > self.grad_spike_factor * median:
                text = f"gradient-norm spike at step {step}: {grad:.4g} against a running median of {median:.4g}"
                found.append(_warning(GRAD_SPIKE, step, grad, text))
        self._grad.append(grad)
        return found

    def _check_throughput(self, step: int, tokens_per_sec: float) -> list[HealthWarning]:
        if not math.isfinite(tokens_per_sec):
            return []
        found = []
        if self._ready(step, self._throughput):
            median = statistics.median(self._throughput)
            if tokens_per_sec < self.throughput_drop_fraction * median:
                text = (
                    f"throughput dropped at step {step}: {tokens_per_sec:.4g} tokens/s against a running "
                    f"median of {median:.4g}"
                )
                found.append(_warning(THROUGHPUT_DROP, step, tokens_per_sec, text))
        self._throughput.append(tokens_per_sec)
        return found

    def _check_state(self, step: int, w_norm: float) -> list[HealthWarning]:
        if not math.isfinite(w_norm):
            return [_warning(STATE_GROWTH, step, w_norm, f"state/w_norm is {w_norm} at step {step}")]
        self._state.append((step, w_norm))
        while len(self._state) > 1 and self._state[1][0] <= step - self.state_window:
            self._state.popleft()  # keep the newest value at least state_window steps old as the reference
        then, oldest = self._state[0]
        if step <= self.warmup or step - then < self.state_window:
            return []
        if w_norm > self.state_growth_factor * max(oldest, 1e-12):
            text = f"state/w_norm grew from {oldest:.4g} to {w_norm:.4g} over {step - then} steps (step {step})"
            return [_warning(STATE_GROWTH, step, w_norm, text)]
        return []


def _warning(kind: str, step: int, value: float, what: str) -> HealthWarning:
    return HealthWarning(kind=kind, step=int(step), message=f"{what}; {_ADVICE[kind]}", value=value)
