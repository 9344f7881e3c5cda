"""Console notices shared by the loggers."""

from __future__ import annotations

import logging

_log = logging.getLogger("tttexp.loggers")


def notice(message: str) -> None:
    """Emit one console line (a WARNING of logger ``tttexp.loggers``, so Hydra's log file keeps it too).

    With no logging configured Python prints WARNING records to stderr, so the line is never lost.
    """
    _log.warning(" ".join(message.split()))


def one_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message``, shortened to ``limit`` characters."""
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."
