"""Who owns a run directory, and which run a checkpoint belongs to.

* One live run per directory: :class:`RunLock` holds an exclusive ``flock`` on ``<run_dir>/.lock`` (the PID
  written inside). The kernel drops the lock when its holder dies, even by ``kill -9``, so a lock left by a
  killed run is stale by construction and the next run takes it over.
* A fresh run (``resume=null``) never adopts or deletes another run's files: in a directory that already holds
  checkpoints it stops and says to use ``resume=auto`` or a new directory.
* A resume continues the same run: the checkpoint's config fingerprint (model shape, tokenizer, data, seed and
  the optimizer's numbers: the config fields marked ``RESUME``, tttexp/configs.py) must equal this run's; a
  difference is refused in one line naming the keys. Keys that do not change the math (``trainer.max_steps``,
  cadences, logging, kernels, compile) may change.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tttexp.errors import CheckpointError, ConfigError
from tttexp.training.checkpoint import checkpoint_dir, latest_valid_checkpoint, list_checkpoints, load_checkpoint

LOCK_FILE = ".lock"
TOKENIZER_DIR = "tokenizer"  # the run's tokenizer as a transformers directory; export ships it with the model
_TMP = re.compile(r"^\.step-\d{8}\.pt\.tmp-(\d+)$")

# --------------------------------------------------------------------------------------------------------------
# The lock
# --------------------------------------------------------------------------------------------------------------


class RunLock:
    """An exclusive, non-blocking lock on a run directory for the life of one run (its launcher process)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self, check: Callable[[], None] | None = None) -> RunLock:
        """Take the lock; then ``check`` (the app's ownership rules, run under the lock) may still refuse. A
        refused run leaves the directory as it found it: a lock file or directory it had to create is removed,
        and the holder's PID is written only once the run owns the directory."""
        created_dir = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        created_file = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise ConfigError(
                f"run directory {self.run_dir} is in use by another run (PID {holder or 'unknown'}); wait for it "
                "to end, or choose another hydra.run.dir"
            ) from None
        try:
            if check is not None:
                check()
        except BaseException:
            if created_file:
                self.path.unlink(missing_ok=True)
            os.close(fd)
            if created_dir:
                with contextlib.suppress(OSError):
                    self.run_dir.rmdir()
            raise
        previous = _read_holder(fd)
        if previous and previous != _me():
            print(f"note: run directory {self.run_dir} was held by {previous}, which ended without releasing it; "
                  "taking it over", file=sys.stderr, flush=True)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{_me()}\n".encode(), 0)
        self._fd = fd
        remove_stale_temporaries(self.run_dir)
        return self

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # an empty lock file: nobody holds the directory
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _me() -> str:
    return f"{os.getpid()} on {socket.gethostname()}"


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        return ""


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete ``.step-*.pt.tmp-PID`` files whose writer is no longer running; returns what was removed."""
    folder = checkpoint_dir(run_dir)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        match = _TMP.match(path.name)
        if match and not _alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------------------------------------------
# Ownership and the fingerprint
# --------------------------------------------------------------------------------------------------------------


def fingerprint(cfg: Any, keys: Mapping[str, Any], world_size: int = 1) -> dict[str, Any]:
    """The value in ``cfg`` (a DictConfig, a nested dict or the built config dataclasses) of each dotted key of
    ``keys`` (the fields marked ``RESUME``), as plain values; a key that the config's option does not take has the
    default ``keys`` gives. ``global_batch`` counts the ``world_size`` processes (a checkpoint continues at another
    world size with the same global batch: training/reshard.py)."""
    data, trainer = _get(cfg, "data"), _get(cfg, "trainer")
    out: dict[str, Any] = {}
    for key, default in keys.items():
        node: Any = cfg
        for part in key.split("."):
            node = _get(node, part, _ABSENT)
            if node is _ABSENT:
                node = default
                break
        out[key] = _plain(node)
    out["global_batch"] = _get(data, "batch_size") * _get(trainer, "grad_accum_steps") * world_size
    return out


_ABSENT = object()


def _get(node: Any, key: str, absent: Any = None) -> Any:
    if isinstance(node, Mapping) or hasattr(node, "keys"):
        return node.get(key, absent)
    return getattr(node, key, absent)


def _plain(value: Any) -> Any:
    if hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return [_plain(v) for v in value]
    return value


def check_fingerprint(saved: Mapping[str, Any] | None, current: Mapping[str, Any], path: Path,
                      rows: int | None = None) -> None:
    """Refuse a checkpoint whose run had other math-deciding settings (one line, naming the keys). ``rows``:
    this run's rows per micro-step (data.batch_size x world size), to say which setting keeps the global batch."""
    if saved is None:
        print(f"warning: {path} carries no config fingerprint (an older checkpoint); resuming without the check",
              file=sys.stderr, flush=True)
        return
    differing = [key for key in current if key in saved and saved[key] != current[key]]
    if differing:
        shown = ", ".join(f"{key} {_short(saved.get(key))} -> {_short(current.get(key))}" for key in differing)
        fix = _global_batch_fix(int(saved["global_batch"]), rows) if differing == ["global_batch"] else None
        raise CheckpointError(
            f"{path} belongs to a run with other settings ({shown}); these change the math, so resuming refuses "
            "them: " + (fix or "resume with the checkpoint's values, or start a new run in a new hydra.run.dir")
        )


def _global_batch_fix(saved_global: int, rows: int | None) -> str | None:
    """The override that gives a run of ``rows`` rows per micro-step the checkpoint's global batch."""
    if not rows:
        return None
    if saved_global % rows == 0:
        return f"set trainer.grad_accum_steps={saved_global // rows} to keep the global batch of {saved_global}"
    return (f"choose data.batch_size x trainer.grad_accum_steps x processes = {saved_global} (the checkpoint's "
            "global batch)")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def resume_state(resume: str | None, run_dir: Path, current: Mapping[str, Any],
                 rows: int | None = None) -> dict[str, Any] | None:
    """The checkpoint state a run starts from (``None``: a fresh start), after the ownership and fingerprint rules.

    ``resume=null``: the directory must hold no checkpoints. ``resume=auto``: the newest valid checkpoint of the
    directory, or a fresh start when there is none; when every checkpoint is damaged, stop (starting over is a
    choice, not a fallback). ``resume=<path>``: that file; the directory must hold no other run's checkpoints.
    """
    found = _starting_point(resume, Path(run_dir), current, quiet=False, rows=rows)
    if found is None:
        return None
    path, state = found
    print(f"resuming from {path} (step {state['step']})", flush=True)
    return state


def check_claim(resume: str | None, run_dir: Path, current: Mapping[str, Any], rows: int | None = None) -> None:
    """The rules of :func:`resume_state`, checked before the run writes anything into ``run_dir``: raises the
    same one-line error, prints nothing, and maps checkpoints from disk instead of reading them."""
    _starting_point(resume, Path(run_dir), current, quiet=True, rows=rows)


def _starting_point(resume: str | None, run_dir: Path, current: Mapping[str, Any],
                    quiet: bool, rows: int | None = None) -> tuple[Path, dict[str, Any]] | None:
    existing = list_checkpoints(run_dir)
    if resume is None:
        if existing:
            raise CheckpointError(
                f"{run_dir} holds another run's checkpoints (newest {existing[0].name}); continue that run with "
                "resume=auto, or start a new run in a new hydra.run.dir"
            )
        return None
    if resume == "auto":
        if not existing:
            return None
        found = latest_valid_checkpoint(run_dir, quiet=quiet)
        if found is None:
            raise CheckpointError(
                f"resume=auto found {len(existing)} checkpoint(s) in {checkpoint_dir(run_dir)} and none loads; "
                "to start over, use resume=null in a new hydra.run.dir"
            )
        path, state = found
    else:
        path = Path(resume)
        if existing and path.resolve().parent != checkpoint_dir(run_dir).resolve():
            raise CheckpointError(
                f"{run_dir} holds another run's checkpoints (newest {existing[0].name}); resume={path} must "
                "continue into a directory of its own: choose a new hydra.run.dir"
            )
        state = load_checkpoint(path, mmap=quiet)
    if quiet and state.get("fingerprint") is None:
        return path, state
    check_fingerprint(state.get("fingerprint"), current, path, rows)
    return path, state
