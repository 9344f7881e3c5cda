"""The interface the trainer codes against, and the logger that does nothing."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

Scalar = float | int | str | bool


@dataclass(frozen=True)
class Resume:
    """What a logger needs to continue a run from a checkpoint: the step it was written at (records after it
    are replays) and the wandb run id it carries (the same wandb run goes on)."""

    step: int
    wandb_run_id: str | None = None


@runtime_checkable
class Logger(Protocol):
    """Receives everything a training run reports. ``finish`` is always called, also after an error."""

    def start(self, run_dir: Path, config: Mapping[str, Any], facts: Mapping[str, Any],
              resume: Resume | None = None) -> None:
        """Begin the run. ``config`` is the resolved Hydra config as a plain dict; ``facts`` are derived
        values (``model/...``, world size, device, git commit, seed). ``model/...`` facts are also logged
        as one record at step 0. ``resume`` is set when the run continues from a checkpoint."""
        ...

    def log(self, metrics: Mapping[str, Scalar], step: int) -> None: ...

    def log_text(self, key: str, text: str, step: int) -> None: ...

    def log_table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None: ...

    def log_image(self, key: str, path: Path, step: int) -> None: ...

    def alert(self, title: str, text: str) -> None: ...

    def finish(self, summary: Mapping[str, Any], failed: bool = False) -> None: ...


class NullLogger:
    """A logger that ignores everything (``_target_: tttexp.loggers.NullLogger``)."""

    def start(self, run_dir: Path, config: Mapping[str, Any], facts: Mapping[str, Any],
              resume: Resume | None = None) -> None:
        pass

    def log(self, metrics: Mapping[str, Scalar], step: int) -> None:
        pass

    def log_text(self, key: str, text: str, step: int) -> None:
        pass

    def log_table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        pass

    def log_image(self, key: str, path: Path, step: int) -> None:
        pass

    def alert(self, title: str, text: str) -> None:
        pass

    def finish(self, summary: Mapping[str, Any], failed: bool = False) -> None:
        pass
