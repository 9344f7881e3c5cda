"""``metrics.jsonl`` and ``summary.json``: the backend-independent record of a run.

Every line is one JSON object. Metric records are ``{"step": <int>, "<name>": <value>, ...}``, one per
``log`` call. Everything else carries a ``"_type"`` so readers can skip it:

* ``{"_type": "start", "time": <unix s>, "appended": <bool>, "facts": {...}}`` at every (re)start; ``appended``
  says the file already held records (a restarted or resumed job), not whether a checkpoint was loaded,
* ``{"_type": "text", "step", "key", "text"}``, ``{"_type": "table", "step", "key", "columns", "rows"}``,
  ``{"_type": "image", "step", "key", "path"}``, ``{"_type": "alert", "time", "title", "text"}``,
* ``{"_type": "finish", "time", "failed"}``.

Each line is flushed as it is written, so a crash loses at most the line being written; a restarted run
appends. A run resumed from a checkpoint first drops the records after the checkpoint's step (the steps it
is about to replay), so every step appears once. A write that fails (the disk is full) is reported in one
line, metrics stop, and training goes on; ``summary.json`` is written atomically or not at all.

Non-finite floats are written as Python's ``json`` does (``NaN``, ``Infinity``): a NaN loss is a fact worth
keeping, and ``json.loads`` reads it back.
"""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from tttexp.distributed.world import process_rank
from tttexp.loggers._runtime import notice
from tttexp.loggers.catalogue import model_facts
from tttexp.loggers.protocol import Resume, Scalar
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
        self._broken = False  # a write failed: metrics stopped (reported once)

    def start(self, run_dir: Path, config: Mapping[str, Any], facts: Mapping[str, Any],
              resume: Resume | None = None) -> None:
        if process_rank() != 0:
            return
        path = self._path_arg if self._path_arg is not None else Path(METRICS_FILE)
        self.path = path if path.is_absolute() else Path(run_dir) / path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        appended = self.path.exists() and self.path.stat().st_size > 0
        if appended and resume is not None:
            truncate_after(self.path, resume.step)
        self._last_step, self._broken = 0, False
        self._file = self.path.open("a", encoding="utf-8")
        if appended and not _ends_with_newline(self.path):
            self._file.write("\n")  # the previous process died mid-line: keep its fragment on its own line
        self._write({"_type": "start", "time": time.time(), "appended": appended, "facts": plain_dict(facts)})
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
            tmp = summary_path.with_name(f".{SUMMARY_FILE}.tmp")
            try:
                tmp.write_text(json.dumps(plain_dict(summary), indent=2) + "\n", encoding="utf-8")
                os.replace(tmp, summary_path)
            except OSError as err:
                tmp.unlink(missing_ok=True)
                notice(f"{summary_path} could not be written: {_reason(err)}")
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
        if self._broken:
            return
        assert self._file is not None
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as err:
            self._broken = True
            step = record.get("step", getattr(self, "_last_step", 0))
            notice(f"error: {self.path} could not be written ({_reason(err)}); metrics stopped at step {step}, "
                   "training goes on (checkpoints are separate)")
            return
        if "step" in record:
            self._last_step = record["step"]


def truncate_after(path: Path, step: int) -> int:
    """Drop the records of steps after ``step`` (replayed after a resume); keeps everything else, rewrites the
    file atomically. Returns how many records were dropped."""
    kept, dropped = [], 0
    with Path(path).open(encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1  # a fragment left by a crash mid-line
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step:
                dropped += 1
                continue
            kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        tmp = Path(path).with_name(f".{Path(path).name}.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)
    return dropped


def _reason(err: OSError) -> str:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk is full: {err.strerror}"
    return err.strerror or str(err)


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
