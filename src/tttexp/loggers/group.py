"""Fan-out to several loggers, so one failing backend never stops the others or the training."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tttexp.loggers._runtime import notice, one_line
from tttexp.loggers.protocol import Logger, Resume, Scalar


class LoggerGroup:
    """Calls every member in order. A member that raises is reported in one line and dropped.

    ``loggers`` may be a sequence or, as Hydra configs often compose them, a mapping of name to logger
    (``None`` entries are skipped so a config can switch a member off).
    """

    def __init__(self, loggers: Iterable[Logger] | Mapping[str, Logger | None]) -> None:
        if isinstance(loggers, Mapping):
            members = [(str(name), logger) for name, logger in loggers.items()]
        else:
            members = [(type(logger).__name__, logger) for logger in loggers]
        self._members: list[tuple[str, Logger]] = [(name, lg) for name, lg in members if lg is not None]

    @property
    def loggers(self) -> list[Logger]:
        """The members still active."""
        return [logger for _, logger in self._members]

    def start(self, run_dir: Path, config: Mapping[str, Any], facts: Mapping[str, Any],
              resume: Resume | None = None) -> None:
        if resume is None:  # members written before resume existed keep working
            self._each("start", lambda lg: lg.start(run_dir, config, facts))
        else:
            self._each("start", lambda lg: lg.start(run_dir, config, facts, resume=resume))

    def log(self, metrics: Mapping[str, Scalar], step: int) -> None:
        self._each("log", lambda lg: lg.log(metrics, step))

    def log_text(self, key: str, text: str, step: int) -> None:
        self._each("log_text", lambda lg: lg.log_text(key, text, step))

    def log_table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        self._each("log_table", lambda lg: lg.log_table(key, columns, rows, step))

    def log_image(self, key: str, path: Path, step: int) -> None:
        self._each("log_image", lambda lg: lg.log_image(key, path, step))

    def alert(self, title: str, text: str) -> None:
        self._each("alert", lambda lg: lg.alert(title, text))

    def finish(self, summary: Mapping[str, Any], failed: bool = False) -> None:
        self._each("finish", lambda lg: lg.finish(summary, failed))

    def _each(self, method: str, call: Callable[[Logger], None]) -> None:
        for name, logger in list(self._members):
            try:
                call(logger)
            except Exception as exc:
                notice(f"logger {name} failed in {method}() and is dropped: {one_line(exc)}")
                self._members = [(n, lg) for n, lg in self._members if lg is not logger]
