"""Weights & Biases backend. ``wandb`` is imported lazily in ``start``; nothing here ever raises into the
training loop: any failure prints one line and the logger becomes a no-op.

Step axis: every record carries the training step as the metric ``train/step`` and every series under
``train/ val/ model/ system/ state/ inference/ warnings/`` is defined with ``step_metric="train/step"``.
wandb's own ``_step`` is left to count ``log`` calls. That keeps a resumed run working: a job restarted
from a checkpoint may log steps that the previous attempt already logged, which wandb rejects for its
monotonic ``_step`` but accepts for a step metric.

Calls reach wandb from one background thread, in order, so a training step never waits for wandb's
serialisation and IPC; ``finish`` drains that queue first.

Resume: the run id is kept in ``<run_dir>/wandb_run_id`` and in every checkpoint; a run resumed from a
checkpoint (``start(..., resume=Resume(step, wandb_run_id))``) passes that id with ``resume="allow"`` and
continues the same wandb run, in any directory.
"""

from __future__ import annotations

import queue
import secrets
import string
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tttexp.distributed.world import process_rank
from tttexp.loggers._runtime import notice, one_line
from tttexp.loggers.catalogue import STEP, STEP_PREFIXES, model_facts
from tttexp.loggers.protocol import Resume, Scalar
from tttexp.loggers.values import plain_dict, to_plain
from tttexp.loggers.wandb_mode import check_mode, resolve_mode

RUN_ID_FILE = "wandb_run_id"
TEXT_COLUMNS = ("step", "text")


def read_or_new_run_id(run_dir: Path) -> str:
    """The id kept in ``run_dir/wandb_run_id``, or a fresh one (8 characters of ``[a-z0-9]``)."""
    path = Path(run_dir) / RUN_ID_FILE
    if path.is_file():
        kept = path.read_text(encoding="utf-8").strip()
        if kept:
            return kept
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


class WandbLogger:
    """Logs to a wandb run; ``mode`` is auto, online, offline or disabled (see ``wandb_mode``).

    Only the process with ``RANK`` 0 talks to wandb; the others behave as a NullLogger.
    """

    def __init__(
        self,
        project: str = "tttexp",
        run_name: str | None = None,
        entity: str | None = None,
        group: str | None = None,
        tags: Sequence[str] = (),
        notes: str | None = None,
        mode: str = "auto",
        init_timeout: float = 60.0,
        job_type: str | None = None,
    ) -> None:
        self.mode = check_mode(mode)
        self.project = project
        self.run_name = run_name
        self.entity = entity
        self.group = group
        self.tags = [str(tag) for tag in tags]
        self.notes = notes
        self.init_timeout = float(init_timeout)
        self.job_type = job_type
        self.run_id: str | None = None
        self.sync_dir: Path | None = None
        self._wandb: Any = None
        self._run: Any = None
        self._broken = False
        self._alert_failed = False
        self._text_rows: dict[str, list[list[Any]]] = {}

    @property
    def active(self) -> bool:
        """True while records reach a wandb run."""
        return self._run is not None and not self._broken

    def start(self, run_dir: Path, config: Mapping[str, Any], facts: Mapping[str, Any],
              resume: Resume | None = None) -> None:
        self._broken, self._alert_failed, self._text_rows = False, False, {}
        if process_rank() != 0:
            return
        mode = resolve_mode(self.mode)
        if mode == "disabled":
            return
        try:
            import wandb
        except Exception as exc:
            notice(f"wandb logging is off: wandb cannot be imported ({one_line(exc)})")
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            run = wandb.init(
                dir=str(run_dir),
                project=self.project,
                entity=self.entity,
                group=self.group,
                tags=self.tags or None,
                notes=self.notes,
                name=self.run_name,
                job_type=self.job_type,
                config={**plain_dict(config), **plain_dict(facts)},
                id=(resume.wandb_run_id if resume and resume.wandb_run_id else None) or read_or_new_run_id(run_dir),
                resume="allow",
                mode=mode,
                # silent: no banner, no run summary, no sync hints of its own; the one hint below is enough
                settings=wandb.Settings(init_timeout=self.init_timeout, silent=True),
            )
        except Exception as exc:
            notice(f"wandb logging is off: wandb.init ({mode}) failed: {one_line(exc)}")
            _stop_service(wandb)
            return
        self._wandb, self._run = wandb, run
        self.run_id = run.id
        self.sync_dir = Path(run.dir).parent
        (run_dir / RUN_ID_FILE).write_text(f"{run.id}\n", encoding="utf-8")
        self._guard("start", lambda r: self._prepare(r, facts))
        self._queue: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._drain, name="tttexp-wandb", daemon=True)
        self._worker.start()
        if mode == "offline" and self.active:
            notice(f"wandb is offline; the run is in {self.sync_dir}; upload it with: wandb sync {self.sync_dir}")

    def _prepare(self, run: Any, facts: Mapping[str, Any]) -> None:
        run.define_metric(STEP)
        for prefix in STEP_PREFIXES:
            run.define_metric(f"{prefix}*", step_metric=STEP)
        model = plain_dict(model_facts(facts))
        if model:
            run.summary.update(model)
            run.log({**model, STEP: 0})

    def log(self, metrics: Mapping[str, Scalar], step: int) -> None:
        self._guard("log", lambda run: run.log({**plain_dict(metrics), STEP: int(step)}))

    def log_text(self, key: str, text: str, step: int) -> None:
        """Text samples of one key accumulate in one table (columns step, text), logged whole each time."""

        def call(run: Any) -> None:
            rows = self._text_rows.setdefault(key, [])
            rows.append([int(step), str(text)])
            table = self._wandb.Table(columns=list(TEXT_COLUMNS), data=[list(row) for row in rows])
            run.log({key: table, STEP: int(step)})

        self._guard("log_text", call)

    def log_table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        def call(run: Any) -> None:
            data = [to_plain(list(row)) for row in rows]
            run.log({key: self._wandb.Table(columns=[str(c) for c in columns], data=data), STEP: int(step)})

        self._guard("log_table", call)

    def log_image(self, key: str, path: Path, step: int) -> None:
        if self.active and not Path(path).is_file():
            notice(f"wandb: image {path} for {key!r} does not exist; skipped")
            return
        self._guard("log_image", lambda run: run.log({key: self._wandb.Image(str(path)), STEP: int(step)}))

    def alert(self, title: str, text: str) -> None:
        """A wandb alert (e-mail/Slack when online). A failing alert is reported once and never stops logging."""
        if not self.active:
            return
        if self._in_background():
            self._queue.put(("alert", lambda _run: self.alert(title, text)))
            return
        try:
            self._run.alert(title=str(title), text=str(text), level=self._wandb.AlertLevel.WARN)
        except Exception as exc:
            if not self._alert_failed:
                self._alert_failed = True
                notice(f"wandb alert failed (alerts stay off, logging goes on): {one_line(exc)}")

    def finish(self, summary: Mapping[str, Any], failed: bool = False) -> None:
        """Summary, exit code, then wandb's service is stopped (when no other run is active).

        ``run.finish`` returns before wandb's service has flushed the run's ``.wandb`` file; stopping the
        service waits for that, so the files are complete when ``finish`` returns and no wandb process
        outlives the run. The next ``start`` in this process starts a new service.
        """
        self._flush()
        run, self._run = self._run, None
        if run is None:
            return
        try:
            if not self._broken:
                run.summary.update(plain_dict(summary))
            run.finish(exit_code=1 if failed else 0)
        except Exception as exc:
            if not self._broken:
                self._broken = True
                notice(f"wandb finish failed: {one_line(exc)}")
        problem = _stop_service(self._wandb)
        if problem and not self._broken:
            notice(f"wandb teardown failed: {problem}")
        self._broken = True

    def _in_background(self) -> bool:
        """True when calls should be queued for the worker (it runs, and this is not the worker itself)."""
        worker = getattr(self, "_worker", None)
        return worker is not None and worker.is_alive() and threading.current_thread() is not worker

    def _guard(self, where: str, call: Callable[[Any], None]) -> None:
        if not self.active:
            return
        if self._in_background():
            self._queue.put((where, call))
            return
        try:
            call(self._run)
        except Exception as exc:
            self._broken = True
            notice(f"wandb logging is off after an error in {where}(): {one_line(exc)}")

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            self._guard(*item)

    def _flush(self) -> None:
        """Wait until every queued call has reached wandb, then stop the worker."""
        worker = getattr(self, "_worker", None)
        if worker is not None and worker.is_alive():
            self._queue.put(None)
            worker.join()
        self._worker = None


def _stop_service(wandb: Any) -> str | None:
    """Stop wandb's background service unless a run is still active; returns the problem, if any."""
    try:
        if getattr(wandb, "run", None) is None:
            wandb.teardown()
    except (Exception, SystemExit) as exc:  # teardown calls sys.exit when the service itself failed
        return one_line(exc)
    return None
