"""Checkpoints that never lose work: atomic writes, newest-valid discovery, data-only loading.

A checkpoint is ``checkpoints/step-XXXXXXXX.pt`` in the run directory: a dict of tensors and plain Python
values, loaded with ``torch.load(weights_only=True)`` so that loading one never executes code from the file.
"""

from __future__ import annotations

import os
import random
import re
import sys
from pathlib import Path
from typing import Any

import torch

from tttexp.errors import CheckpointError

CKPT_DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d{8})\.pt$")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CKPT_DIR


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step-{step:08d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints of a run directory, newest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _NAME.match(p.name)]
    return sorted(found, key=lambda p: p.name, reverse=True)


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], keep_last: int = 2) -> Path:
    """Write atomically (temporary file, flush, fsync, rename), then keep only the newest ``keep_last``.

    On any failure (disk full, unwritable directory) the temporary file is removed, earlier checkpoints are
    untouched, and a :class:`CheckpointError` says what happened.
    """
    path = checkpoint_path(run_dir, step)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except (OSError, RuntimeError) as err:
        tmp.unlink(missing_ok=True)
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0]
        raise CheckpointError(f"could not write checkpoint {path}: {reason}") from err
    if keep_last > 0:
        for old in list_checkpoints(run_dir)[keep_last:]:
            old.unlink(missing_ok=True)
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load tensors and plain values only; anything else, or a damaged file, is a one-line CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - every failure to read becomes one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise CheckpointError(f"checkpoint {path} holds more than tensors and plain values; refusing it") from err
        raise CheckpointError(f"checkpoint {path} is damaged or truncated ({first[:120]})") from err
    if not isinstance(state, dict) or "step" not in state or "model" not in state:
        raise CheckpointError(f"checkpoint {path} is not a tttexp checkpoint (no step/model entries)")
    return state


def latest_valid_checkpoint(run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads; damaged ones are reported in one line each and skipped."""
    for path in list_checkpoints(run_dir):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as err:
            print(f"warning: {err}; trying the previous one", file=sys.stderr, flush=True)
    return None


def rng_state() -> dict[str, Any]:
    """Every generator the loop draws from, as tensors and plain values."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _python_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _python_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]
