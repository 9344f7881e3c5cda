"""Checkpoints that never lose work: atomic writes, newest-valid discovery, data-only loading.

A checkpoint is ``checkpoints/step-XXXXXXXX.pt`` in the run directory: a dict of tensors and plain Python
values, loaded with ``torch.load(weights_only=True)`` so that loading one never executes code from the file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from tttexp.errors import CheckpointError
from tttexp.training.dcp import MARKER, is_sharded, load_trainer_state
from tttexp.training.durable import fsync_dir

CKPT_DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d{8})\.(pt|dcp)$")  # .dcp: a sharded checkpoint directory (training/dcp.py)
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive
DAMAGED = ".damaged"  # the suffix of a checkpoint set aside because it does not load


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


def step_of(path: Path) -> int:
    """The step in a checkpoint's file name."""
    match = _NAME.match(Path(path).name)
    return int(match.group(1)) if match else -1


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], keep_last: int = 2) -> Path:
    """Write atomically (temporary file, flush, fsync, rename), then prune.

    Pruning keeps the ``keep_last`` newest checkpoints up to this one and removes only older ones: a checkpoint
    with a higher step (another branch of the run) is never deleted. On any failure (disk full, unwritable
    directory) the temporary file is removed, earlier checkpoints are untouched, and a :class:`CheckpointError`
    says what happened in one line.
    """
    path = checkpoint_path(run_dir, step)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    sink: _Sink | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            sink = _Sink(fh)
            torch.save(state, sink)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except (OSError, RuntimeError) as err:
        tmp.unlink(missing_ok=True)
        cause = sink.error if sink is not None and sink.error is not None else err
        raise CheckpointError(f"could not write checkpoint {path}: {_write_reason(cause, path.parent)}") from err
    prune_checkpoints(run_dir, step, keep_last)
    return path


def prune_checkpoints(run_dir: Path, step: int, keep_last: int) -> None:
    """Keep the ``keep_last`` newest checkpoints up to ``step`` (the one just written included) that load; remove
    older ones, and older sharded directories whose save never completed.

    Each file that would be kept is opened as a checkpoint first (mapped, not read): a damaged one is set aside as
    ``*.damaged`` (named in one warning) and does not count as kept, so the newest checkpoint that loads is never
    the one removed. A checkpoint with a higher step (another branch of the run) is never touched."""
    if keep_last <= 0:
        return
    kept, damaged = 0, []
    for path in [p for p in list_checkpoints(run_dir) if step_of(p) <= step]:
        if path.is_dir() and not (path / MARKER).is_file():
            if step_of(path) < step:  # a sharded save that never completed
                shutil.rmtree(path, ignore_errors=True)
            continue
        if kept >= keep_last:
            _remove(path)
        elif path.is_dir() or _loads(path):
            kept += 1
        else:
            damaged.append(set_aside(path))
    if damaged:
        names = ", ".join(p.name for p in damaged)
        print(f"warning: damaged checkpoint(s) set aside as {names} (they do not count toward trainer.keep_last)",
              file=sys.stderr, flush=True)


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint to ``*.damaged``: kept for a look, never loaded, listed or counted again."""
    target = path.with_name(path.name + DAMAGED)
    with contextlib.suppress(FileNotFoundError):  # another process of the job set it aside first
        os.replace(path, target)
    return target


def _loads(path: Path) -> bool:
    try:
        load_checkpoint(path, mmap=True)
    except CheckpointError:
        return False
    return True


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class _Sink:
    """The file torch.save writes to, keeping the OSError of a failed write (torch reports only its own
    ``enforce fail`` line)."""

    def __init__(self, fh: Any) -> None:
        self.fh = fh
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.fh.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.fh.flush()


def _write_reason(err: BaseException, folder: Path) -> str:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk is full ({err.strerror}); free space on {folder} or point hydra.run.dir elsewhere"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    try:
        if shutil.disk_usage(folder).free < 1 << 20:
            return f"the disk is full; free space on {folder} or point hydra.run.dir elsewhere"
    except OSError:
        pass
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Load tensors and plain values only; anything else, or a damaged file, is a one-line CheckpointError.
    ``mmap``: map the tensors instead of reading them (a cheap check that the file loads)."""
    path = Path(path)
    if is_sharded(path):
        return load_trainer_state(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != _ZIP_MAGIC:
        raise CheckpointError(f"{path} is not a checkpoint (not a torch.save archive)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - every failure to read becomes one line
        text = str(err)
        if "Unsupported global" in text or "Unsupported operand" in text or "GLOBAL" in text:
            raise CheckpointError(f"checkpoint {path} holds more than tensors and plain values; refusing it") from err
        size = path.stat().st_size
        raise CheckpointError(
            f"checkpoint {path} is damaged or truncated ({size} bytes; the archive cannot be read); "
            "resume from an earlier one"
        ) from err
    if not isinstance(state, dict) or "step" not in state or "model" not in state:
        raise CheckpointError(f"{path} is not a tttexp checkpoint (no step/model entries)")
    return state


def latest_valid_checkpoint(run_dir: Path, quiet: bool = False) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads. Damaged ones are skipped, each set aside as ``*.damaged`` and reported
    in one line; ``quiet``: only look (nothing printed or renamed, tensors mapped, not read)."""
    for path in list_checkpoints(run_dir):
        try:
            return path, load_checkpoint(path, mmap=quiet)
        except CheckpointError as err:
            if quiet:
                continue
            where = ""
            if path.is_file():
                where = f"; set aside as {set_aside(path).name}"
            print(f"warning: {err}{where}; trying the previous one", file=sys.stderr, flush=True)
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


def shape_mismatches(err: RuntimeError) -> str:
    """The mismatched parameters of a failed ``load_state_dict``, in one line."""
    found = re.findall(r"size mismatch for ([\w.]+): copying a param with shape torch.Size\(\[([^\]]*)\]\) "
                       r"from checkpoint, the shape in current model is torch.Size\(\[([^\]]*)\]\)", str(err))
    if found:
        shown = "; ".join(f"{name} [{a}] vs [{b}]" for name, a, b in found[:3])
        more = f" and {len(found) - 3} more" if len(found) > 3 else ""
        return f"{len(found)} shape(s) differ ({shown}{more})"
    missing = re.search(r"Missing key\(s\) in state_dict: ([^.]*)", str(err))
    return f"missing parameters ({missing.group(1)[:120]})" if missing else str(err).splitlines()[0][:160]
