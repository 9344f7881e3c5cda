"""``metrics.jsonl`` and ``summary.json``: the backend-independent record of a run.

Every line is one JSON object. Metric records are ``{"step": <int>, "<name>": <value>, ...}``, one per
``log`` call. Everything else carries a ``"_type"`` so readers can skip it:

* ``{"_type": "start", "time": <unix s>, "resumed": <bool>, "facts": {...}}`` at every (re)start,
* ``{"_type": "text", "step", "key", "text"}``, ``{"_type": "table", "step", "key", "columns", "rows"}``,
  ``{"_type": "image", "step", "key", "path"}``, ``{"_type": "alert", "time", "title", "text"}``,
* ``{"_type": "finish", "time", "failed"}``.

Each line is flushed as it is written, so a crash loses at most the line being written; a restarted run
appends. Non-finite floats are written as Python's ``json`` does (``NaN``, ``Infinity``): a NaN loss is
a fact worth keeping, and ``json.loads`` reads it back.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from tttexp.distributed.world import process_rank
from tttexp.loggers.catalogue import model_facts
from tttexp.loggers.protocol import Scalar
from tttexp.loggers.values import plain_dict, to_plain

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


class JsonlLogger:
    """Append-only JSON-lines log of the run, plus ``summary.json`` beside it at ``finish``.

    ``path`` defaults to ``<run_dir>/metrics.jsonl``; a relative path is taken relative to the run
    directory. Only the process with ``RANK`` 0 writes.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self._path_arg = Path(path) if path is not None else None
        self.path: Path | None = None
        self._file: IO[str] | None = None

    def start(self, run_dir: Path, config: Mapping[str, Any], facts: Mapping[str, Any]) -> None:
        if process_rank() != 0:
            return
        path = self._path_arg if self._path_arg is not None else Path(METRICS_FILE)
        self.path = path if path.is_absolute() else Path(run_dir) / path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        resumed = self.path.exists() and self.path.stat().st_size > 0
        self._file = self.path.open("a", encoding="utf-8")
        if resumed and not _ends_with_newline(self.path):
            self._file.write("\n")  # the previous process died mid-line: keep its fragment on its own line
        self._write({"_type": "start", "time": time.time(), "resumed": resumed, "facts": plain_dict(facts)})
        model = model_facts(facts)
        if model:
            self.log(model, step=0)

    def log(self, metrics: Mapping[str, Scalar], step: int) -> None:
        if self._active():
            self._write({"step": int(step), **{k: v for k, v in plain_dict(metrics).items() if k != "step"}})

    def log_text(self, key: str, text: str, step: int) -> None:
        if self._active():
            self._write({"_type": "text", "step": int(step), "key": key, "text": str(text)})

    def log_table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        if self._active():
            record = {"_type": "table", "step": int(step), "key": key, "columns": to_plain(list(columns))}
            self._write({**record, "rows": to_plain([list(row) for row in rows])})

    def log_image(self, key: str, path: Path, step: int) -> None:
        if self._active():
            self._write({"_type": "image", "step": int(step), "key": key, "path": str(path)})

    def alert(self, title: str, text: str) -> None:
        if self._active():
            self._write({"_type": "alert", "time": time.time(), "title": title, "text": text})

    def finish(self, summary: Mapping[str, Any], failed: bool = False) -> None:
        if self._file is None or self.path is None:
            return
        try:
            self._write({"_type": "finish", "time": time.time(), "failed": bool(failed)})
            summary_path = self.path.parent / SUMMARY_FILE
            summary_path.write_text(json.dumps(plain_dict(summary), indent=2) + "\n", encoding="utf-8")
        finally:
            self._file.close()
            self._file = None

    def _active(self) -> bool:
        if self._file is not None:
            return True
        if self.path is None and process_rank() == 0:
            raise RuntimeError("JsonlLogger used before start()")
        return False

    def _write(self, record: Mapping[str, Any]) -> None:
        assert self._file is not None
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as handle:
        handle.seek(-1, 2)
        return handle.read(1) == b"\n"


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Every record of a ``metrics.jsonl``; a line cut short by a crash is skipped."""
    with Path(path).open(encoding="utf-8") as handle:
        for line in handle:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Only the metric records (``{"step": ..., name: value}``) of a ``metrics.jsonl``."""
    return [record for record in read_jsonl(path) if "_type" not in record]
