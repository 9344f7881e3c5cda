import math
import random
from collections.abc import Callable, Iterator

import pytest

from tttexp.loggers import HealthMonitor
from tttexp.loggers.health import KINDS

Metrics = dict[str, float]


def noisy_run(seed: int, steps: int = 3000) -> Iterator[tuple[int, Metrics]]:
    """A healthy run: steep then slow loss decay with batch noise, heavy-tailed gradient norms, a slow
    compile at the start, jittery throughput and a state norm that grows and saturates."""
    rng = random.Random(seed)
    for step in range(1, steps + 1):
        loss = (2.2 + 8.5 * math.exp(-step / 150) + 0.3 * math.exp(-step / 1000)) * (1 + rng.gauss(0, 0.04))
        grad = (0.4 + 3.0 * math.exp(-step / 100)) * math.exp(rng.gauss(0, 0.35))
        tokens_per_sec = 4000.0 if step <= 3 else 48000 * (1 + rng.gauss(0, 0.05))
        w_norm = 10 * (3 - 2 * math.exp(-step / 400)) * (1 + rng.gauss(0, 0.02))
        yield (
            step,
            {
                "train/loss": loss,
                "train/grad_norm": grad,
                "train/tokens_per_sec": tokens_per_sec,
                "state/w_norm": w_norm,
                "train/learning_rate": 3e-4,
            },
        )


@pytest.mark.parametrize("seed", range(5))
def test_a_healthy_noisy_run_raises_nothing(seed: int) -> None:
    monitor = HealthMonitor()
    warnings = [w for step, metrics in noisy_run(seed) for w in monitor.update(step, metrics)]
    assert warnings == []
    assert monitor.counts() == {f"warnings/{kind}": 0 for kind in KINDS}


def _run_with(edit: Callable[[int, Metrics], None]) -> tuple[HealthMonitor, list[tuple[str, int]]]:
    monitor = HealthMonitor()
    seen = []
    for step, metrics in noisy_run(seed=0):
        edit(step, metrics)
        seen += [(w.kind, w.step) for w in monitor.update(step, metrics)]
    return monitor, seen


def test_nonfinite_loss_and_grad_are_caught_even_during_warmup() -> None:
    def edit(step: int, metrics: Metrics) -> None:
        if step in (2, 700):
            metrics["train/loss"] = float("nan")
        if step == 900:
            metrics["train/grad_norm"] = float("inf")

    monitor, seen = _run_with(edit)
    assert seen == [("nonfinite_loss", 2), ("nonfinite_loss", 700), ("nonfinite_grad", 900)]
    assert monitor.counts()["warnings/nonfinite_loss"] == 2
    assert monitor.counts()["warnings/nonfinite_grad"] == 1


def test_spikes_drops_and_state_growth_are_caught() -> None:
    def edit(step: int, metrics: Metrics) -> None:
        if step == 800:
            metrics["train/loss"] *= 3
        if step == 1200:
            metrics["train/grad_norm"] *= 20
        if 1500 <= step < 1505:
            metrics["train/tokens_per_sec"] *= 0.2
        if step >= 2500:
            metrics["state/w_norm"] *= 1.05 ** (step - 2500)

    monitor, seen = _run_with(edit)
    assert ("loss_spike", 800) in seen and ("grad_spike", 1200) in seen
    assert [s for kind, s in seen if kind == "throughput_drop"] == [1500, 1501, 1502, 1503, 1504]
    growth = [s for kind, s in seen if kind == "state_growth"]
    assert growth and 2500 < growth[0] < 2560  # 1.05**29 > 4: caught about 30 records in
    counts = monitor.counts()
    assert counts["warnings/loss_spike"] == 1 and counts["warnings/grad_spike"] == 1
    assert counts["warnings/throughput_drop"] == 5
    assert counts["warnings/state_growth"] == len(growth)
    assert counts["warnings/nonfinite_loss"] == counts["warnings/nonfinite_grad"] == 0


def test_warning_messages_say_what_to_do() -> None:
    monitor = HealthMonitor()
    (warning,) = monitor.update(5, {"train/loss": float("inf")})
    assert warning.kind == "nonfinite_loss" and warning.step == 5 and warning.value == math.inf
    assert "learning rate" in warning.message and "checkpoint" in warning.message


def test_tiny_losses_need_an_absolute_jump_to_count_as_a_spike() -> None:
    monitor = HealthMonitor()
    rng = random.Random(1)
    found = [w for step in range(500) for w in monitor.update(step, {"train/loss": 0.02 * (1 + rng.random())})]
    assert found == []


def test_non_numeric_and_missing_values_are_ignored() -> None:
    monitor = HealthMonitor()
    assert monitor.update(1, {"train/loss": "n/a", "train/grad_norm": True, "val/loss": 3.0}) == []
