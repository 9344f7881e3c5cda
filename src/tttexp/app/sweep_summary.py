"""Sweep summary: after ``-m``, one row per job (its overrides, losses, speed) as ``summary.csv`` and a table.

:class:`SweepSummary` is a Hydra callback (registered in ``train.yaml``). A job directory of a sweep holds
``.hydra/overrides.yaml`` and, once training has ended, ``summary.json``. A job is ``ok`` when it has
``summary.json`` and the last start/finish record of its ``metrics.jsonl`` is a finish without failure; a job
without ``summary.json``, one whose run failed (the logger still writes the summary so far) and one that was
started again and never finished are ``failed``. Failed jobs are also named in one line as they end, so a sweep
that goes on past them (Optuna with ``max_failure_rate``) says which trial broke and why.

This module stays import-light (no torch): Hydra instantiates its callbacks for every run.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from tttexp.loggers import catalogue as C

log = logging.getLogger(__name__)

SUMMARY_CSV = "summary.csv"
#: (column, key in summary.json, decimals in the printed table)
METRICS: tuple[tuple[str, str, int], ...] = (
    ("final_loss", C.SUMMARY_FINAL_LOSS, 4),
    ("final_val_loss", C.SUMMARY_FINAL_VAL_LOSS, 4),
    ("final_val_ppl", C.SUMMARY_FINAL_VAL_PPL, 2),
    ("tokens_per_sec", C.SUMMARY_AVG_TOKENS_PER_SEC, 0),
)
_SKIP_DIRS = {"checkpoints", "wandb", "elastic"}  # never hold job directories; can be large


@dataclass
class JobRow:
    """One job of a sweep."""

    job: str  # the job directory relative to the sweep directory (Hydra's job number by default)
    status: str  # ok | failed
    overrides: list[str]
    metrics: dict[str, float | None] = field(default_factory=dict)

    def override_map(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for text in self.overrides:
            key, sep, value = text.partition("=")
            out[key.lstrip("+~")] = value if sep else "(deleted)"
        return out


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Every job directory under ``sweep_dir`` (those with ``.hydra/overrides.yaml``), in job-number order."""
    found: list[Path] = []
    for root, dirs, _files in os.walk(sweep_dir):
        if os.path.isfile(os.path.join(root, ".hydra", "overrides.yaml")):
            found.append(Path(root))
            dirs.clear()  # job directories do not nest
            continue
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in _SKIP_DIRS]
    return sorted(found, key=lambda p: _natural_key(p.relative_to(sweep_dir).as_posix()))


def collect(sweep_dir: Path) -> list[JobRow]:
    """Read every job of a sweep directory."""
    rows = []
    for job_dir in job_dirs(sweep_dir):
        overrides = _read_overrides(job_dir / ".hydra" / "overrides.yaml")
        summary = _read_json(job_dir / "summary.json")
        metrics = {name: _number(summary.get(key)) for name, key, _ in METRICS} if summary is not None else {}
        ended = _last_run_state(job_dir / "metrics.jsonl")
        status = "ok" if summary is not None and ended in ("ok", None) else "failed"
        rows.append(JobRow(job=job_dir.relative_to(sweep_dir).as_posix() or ".", status=status,
                           overrides=overrides, metrics=metrics))
    return rows


def varying_keys(rows: list[JobRow]) -> list[str]:
    """Override keys whose value differs between jobs (or is missing in some): what the sweep varied."""
    maps = [r.override_map() for r in rows]
    keys: list[str] = []
    for m in maps:
        keys += [k for k in m if k not in keys]
    return [k for k in keys if len({m.get(k) for m in maps}) > 1]


def to_csv(rows: list[JobRow]) -> str:
    """CSV text: job, status, the full override list, one column per varied key, then the metrics."""
    varied = varying_keys(rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["job", "status", "overrides", *varied, *(name for name, _, _ in METRICS)])
    for row in rows:
        values = row.override_map()
        metrics = [_csv_number(row.metrics.get(name)) for name, _, _ in METRICS]
        writer.writerow([row.job, row.status, " ".join(row.overrides), *(values.get(k, "") for k in varied), *metrics])
    return buffer.getvalue()


def format_table(rows: list[JobRow]) -> str:
    """A fixed-width table of the jobs; override columns show only what the sweep varied."""
    varied = varying_keys(rows)
    header = ["job", "status", *(varied or ["overrides"]), *(name for name, _, _ in METRICS)]
    body = []
    for row in rows:
        values = row.override_map()
        cells = [row.job, row.status, *([values.get(k, "") for k in varied] or [" ".join(row.overrides)])]
        cells += [_table_number(row.metrics.get(name), decimals) for name, _, decimals in METRICS]
        body.append(cells)
    widths = [max(len(str(line[i])) for line in [header, *body]) for i in range(len(header))]
    numeric = set(range(len(header) - len(METRICS), len(header)))

    def fmt(cells: list[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in pairs)

    lines = [fmt(header), "  ".join("-" * w for w in widths), *(fmt(c) for c in body)]
    return "\n".join(line.rstrip() for line in lines)


def write_summary(sweep_dir: Path) -> list[JobRow]:
    """Write ``summary.csv`` into ``sweep_dir`` (atomically: jobs may end at the same time) and return the rows."""
    rows = collect(sweep_dir)
    if rows:
        target = sweep_dir / SUMMARY_CSV
        tmp = target.with_name(f".{SUMMARY_CSV}.{os.getpid()}.tmp")
        tmp.write_text(to_csv(rows))
        os.replace(tmp, target)
    return rows


def failure_line(job_return: JobReturn) -> str:
    """``job 3 failed: ValueError: ... [optim.lr=0.02 model.ttt_layer=mlp]`` (one line)."""
    err = job_return._return_value  # the exception; reading .return_value would re-raise it
    while isinstance(err, BaseException) and err.__cause__ is not None:  # e.g. the error inside instantiate()
        err = err.__cause__
    reason = f"{type(err).__name__}: {err}" if isinstance(err, BaseException) else str(err)
    reason = " ".join(reason.split())[:300]
    num = _job_num(job_return)
    overrides = " ".join(job_return.overrides or [])
    return f"job {num} failed: {reason} [{overrides}]"


class SweepSummary(Callback):
    """Summarise a multirun in its sweep directory; name each failed job in one line as it ends."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.status == JobStatus.FAILED and _in_multirun(config):  # a single run says why itself
            log.error(failure_line(job_return))
        # With Hydra's in-process launcher jobs run one after another, so a missing summary.json means failed;
        # refreshing here leaves a summary even when the sweep stops early. Parallel launchers wait for the end.
        sweep = OmegaConf.select(config, "hydra.sweep.dir")
        launcher = str(OmegaConf.select(config, "hydra.launcher._target_", default=""))
        if sweep is not None and _in_multirun(config) and launcher.endswith(".BasicLauncher"):
            _write_or_warn(Path(str(sweep)))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        rows = _write_or_warn(sweep_dir) if sweep_dir.is_dir() else []
        if not rows:
            return
        failed = sum(r.status == "failed" for r in rows)
        print(f"\nsweep summary: {len(rows)} jobs, {failed} failed -> {sweep_dir / SUMMARY_CSV}", flush=True)
        print(format_table(rows), flush=True)


# --------------------------------------------------------------------------------------------------------------


def _write_or_warn(sweep_dir: Path) -> list[JobRow]:
    """A summary that cannot be written must not fail the sweep that it summarises."""
    try:
        return write_summary(sweep_dir)
    except OSError as err:
        log.warning(f"could not write {sweep_dir / SUMMARY_CSV}: {err}")
        return []


def _in_multirun(config: DictConfig) -> bool:
    return OmegaConf.select(config, "hydra.job.num") is not None and \
        str(OmegaConf.select(config, "hydra.mode", default="")).endswith("MULTIRUN")


def _job_num(job_return: JobReturn) -> str:
    hydra_cfg = job_return.hydra_cfg
    num = OmegaConf.select(hydra_cfg, "hydra.job.num") if hydra_cfg is not None else None
    return str(num) if num is not None else "?"


def _read_overrides(path: Path) -> list[str]:
    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return []
    return [str(o) for o in loaded] if isinstance(loaded, list) else []


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _last_run_state(metrics: Path) -> str | None:
    """``ok``/``failed`` from the last ``start`` or ``finish`` record of ``metrics.jsonl``; None without one."""
    try:
        with metrics.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 1_000_000))  # the records of interest are at the end
            tail = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    for line in reversed(tail.splitlines()):
        if '"_type"' not in line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("_type") == "finish":
            return "failed" if record.get("failed") else "ok"
        if record.get("_type") == "start":
            return "failed"  # started (or restarted) and never finished
    return None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _csv_number(value: float | None) -> str:
    return "" if value is None else repr(value)


def _table_number(value: float | None, decimals: int) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    return f"{value:,.{decimals}f}"


def _natural_key(text: str) -> list[Any]:
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", text) if part]
