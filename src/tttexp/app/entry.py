"""The one way into every app (``tttexp.train``, ``tttexp.eval``, ``tttexp.export``, and any later one).

Before Hydra starts, the command line goes through the same steps for each app:

1. ``--experimental-rerun`` becomes the saved job's command line, read from YAML (app/rerun.py): Hydra's own
   rerun would unpickle ``.hydra/config.pickle``.
2. Preflight composes every run of the command line with its ``hydra`` node and checks it: the allowlist of
   callables (app/security.py) and the app's own value checks, one line and status 2 on a problem.
3. Ownership of the run directory is decided: the directory's lock, then the app's rules (training: whose
   checkpoints it holds). Hydra writes ``.hydra/`` and opens the log as it starts the job, so a run refused
   here leaves the directory exactly as it was.

Only then does the app's ``@hydra.main`` function run.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from omegaconf import DictConfig

from tttexp.errors import ConfigError, TTTExpError
from tttexp.training import rundir


@dataclass(frozen=True)
class App:
    """What the entry needs to know about an app."""

    name: str  # the app (``tttexp.<name>``), its primary config and Hydra's job name
    hydra_main: Callable[[], Any]  # the app's @hydra.main function
    validate: Callable[[DictConfig], Any]  # its check of a composed config (the allowlist included); the built config
    owns_run_dir: bool = True  # whether it writes into hydra.run.dir (export writes only its ``out``)
    claim: Callable[[DictConfig, Path], None] | None = None  # its own rules for the run directory, under the lock


_HELD: dict[Path, rundir.RunLock] = {}  # run directories this process owns (decided before Hydra started)


def main(app: App, argv: list[str] | None = None) -> None:
    """Run ``app`` with ``argv`` (default: ``sys.argv[1:]``), or exit with one line: 2 for a command line that
    cannot run, 1 for a run directory that is not this run's."""
    args = list(sys.argv[1:] if argv is None else argv)
    from tttexp.app import preflight, rerun

    try:
        args = rerun.expand(args, app.name)  # a rerun becomes its saved command line (no pickle is read)
    except ConfigError as err:
        _fail(err, 2)
    problem = preflight.check(args, app=app.name, validate=app.validate)
    if problem:
        _fail(problem, 2)
    sys.argv[1:] = args
    try:
        lock = claim_run_dir(app, args)
    except TTTExpError as err:
        _fail(err, 1)
    try:
        app.hydra_main()
    finally:
        if lock is not None:
            _HELD.pop(lock.run_dir, None)
            lock.release()


def claim_run_dir(app: App, argv: list[str]) -> rundir.RunLock | None:
    """Own the run directory the job will run in before Hydra writes into it; the lock taken (or None where
    this process does not own a directory: a sweep, ``--cfg``, export, another rank of a world).

    The directory is the composed ``hydra.run.dir``. A value that differs with each composition (``${now:...}``)
    is decided here only for a directory that already exists, and then passed to Hydra as written; a new one
    is owned by the job itself once Hydra made it."""
    from tttexp.app import preflight
    from tttexp.distributed.world import process_rank

    if not app.owns_run_dir:
        return None
    line = preflight.CommandLine(argv, default_config=app.name)
    if line.stand_aside or not line.single_job:
        return None
    try:
        cfg = preflight.compose_line(line, line.overrides, app.name)
        written = cfg.hydra.run._get_node("dir")._value()
        run_dir = Path(str(cfg.hydra.run.dir))
    except Exception:  # noqa: BLE001 - Hydra itself reports a run directory it cannot compose
        return None
    moving = "${" in str(written)
    if moving and not run_dir.exists():
        return None
    if moving:
        if "'" in str(run_dir) or "\\" in str(run_dir):
            return None  # not passed on as written: the job owns it once Hydra made it
        sys.argv.append(f"hydra.run.dir='{run_dir}'")
    where = Path(os.path.abspath(run_dir))
    check = (lambda: app.claim(cfg, where)) if app.claim is not None else None
    if process_rank() != 0:  # another rank of a torchrun/SLURM world: rank 0 holds the lock
        if check is not None:
            check()
        return None
    lock = rundir.RunLock(where).acquire(check)
    _HELD[where] = lock
    return lock


@contextlib.contextmanager
def own(run_dir: Path) -> Iterator[None]:
    """Inside the job: the run directory's lock, unless the entry holds it already (a sweep's job, or a job whose
    directory Hydra named only as it started); held by the first process of the job, not by other ranks."""
    from tttexp.distributed.world import process_rank

    where = Path(os.path.abspath(run_dir))
    if where in _HELD or process_rank() != 0:
        yield
        return
    with rundir.RunLock(where):
        yield


def _fail(message: object, status: int) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)
