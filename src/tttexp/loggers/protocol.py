"""The interface the trainer codes against, and the logger that does nothing."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

Scalar = float | int | str | bool


@runtime_checkable
class Logger(Protocol):
    """Receives everything a training run reports. ``finish`` is always called, also after an error."""

    def start(self, run_dir: Path, config: Mapping[str, Any], facts: Mapping[str, Any]) -> None:
        """Begin the run. ``config`` is the resolved Hydra config as a plain dict; ``facts`` are derived
        values (``model/...``, world size, device, git commit, seed). ``model/...`` facts are also logged
        as one record at step 0."""
        ...

    def log(self, metrics: Mapping[str, Scalar], step: int) -> None: ...

    def log_text(self, key: str, text: str, step: int) -> None: ...

    def log_table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None: ...

    def log_image(self, key: str, path: Path, step: int) -> None: ...

    def alert(self, title: str, text: str) -> None: ...

    def finish(self, summary: Mapping[str, Any], failed: bool = False) -> None: ...


class NullLogger:
    """A logger that ignores everything (``_target_: tttexp.loggers.NullLogger``)."""

    def start(self, run_dir: Path, config: Mapping[str, Any], facts: Mapping[str, Any]) -> None:
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
