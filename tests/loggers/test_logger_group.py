import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from tttexp.loggers import JsonlLogger, LoggerGroup, NullLogger, read_metrics


class Recorder(NullLogger):
    """Remembers every call."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        self.calls.append(f"log {step}")

    def finish(self, summary: Mapping[str, Any], failed: bool = False) -> None:
        self.calls.append(f"finish {failed}")


class BreaksOnStep3(Recorder):
    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        super().log(metrics, step)
        if step == 3:
            raise OSError("disk full\nsecond line of detail")


def _our_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tttexp.loggers"]


def test_failing_member_is_reported_once_and_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    before, broken, after = Recorder(), BreaksOnStep3(), Recorder()
    group = LoggerGroup([before, broken, JsonlLogger(), after])
    group.start(tmp_path, {}, {})
    for step in range(1, 7):
        group.log({"train/loss": 1.0}, step=step)
    group.finish({}, failed=False)

    assert broken.calls == ["log 1", "log 2", "log 3"]
    assert before.calls == after.calls == [*(f"log {s}" for s in range(1, 7)), "finish False"]
    assert len(group.loggers) == 3 and broken not in group.loggers
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    lines = _our_lines(caplog)
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "BreaksOnStep3" in lines[0] and "log()" in lines[0] and "OSError: disk full" in lines[0]


def test_mapping_of_members_skips_switched_off_entries(tmp_path: Path) -> None:
    recorder = Recorder()
    group = LoggerGroup({"jsonl": JsonlLogger(), "wandb": None, "rec": recorder})
    assert len(group.loggers) == 2
    group.start(tmp_path, {}, {})
    group.log({"val/loss": 2.0}, step=10)
    group.finish({})
    assert recorder.calls == ["log 10", "finish False"]
