"""The console, copied into the run's log file: what a user saw is what ``train.log`` keeps.

Hydra's file handler records only ``logging`` calls; the step lines, warnings and the summary table are printed.
:func:`copy_console_to` makes ``sys.stdout`` and ``sys.stderr`` also append to the log file, leaving out the
redraws of a progress bar (writes that carry a carriage return).
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import TextIO


class _Tee(io.TextIOBase):
    def __init__(self, stream: TextIO, log: TextIO) -> None:
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        written = self.stream.write(text)
        if "\r" not in text:
            try:
                self.log.write(text)
                self.log.flush()
            except (OSError, ValueError):  # a full disk or a closed file never stops the console
                pass
        return written

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.stream, "encoding", "utf-8")


def copy_console_to(path: Path) -> None:
    """From now on, everything printed to stdout or stderr is appended to ``path`` too (once per process)."""
    if isinstance(sys.stdout, _Tee):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    log = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - lives as long as the process
    sys.stdout = _Tee(sys.stdout, log)
    sys.stderr = _Tee(sys.stderr, log)
