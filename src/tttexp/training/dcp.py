"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP): every process writes its own shards.

A checkpoint is the directory ``checkpoints/step-XXXXXXXX.dcp`` of the run:

- DCP's files (``__<rank>_<n>.distcp`` and ``.metadata``) hold tensors only: the model (``model.<name>``) and the
  optimizer's per-parameter state (``optim.<name>.<exp_avg|...>``), keyed by parameter name, so any world size
  can read them (resharding is DCP's: each process reads the slices it owns).
- ``trainer.pt`` holds everything else (step, counters, each rank's data position, RNG and carried TTT state,
  the optimizer's hyper-parameters, the model's config), written by rank 0, read with ``weights_only=True``.
- ``COMPLETE`` is written last, by rank 0, once every shard and the metadata are on disk. A directory without it
  is a save that did not finish: ``resume=auto`` skips it with one line and takes the previous checkpoint, which
  is only removed once a newer one is complete.

Loading is data-only. DCP itself reads ``.metadata`` with ``pickle.load`` and any non-tensor entry with
``torch.load(weights_only=False)``; both can run code from the file. Here the metadata goes through an
unpickler that only admits DCP's own metadata classes and plain values, and the load planner refuses non-tensor
entries (none are ever written), so nothing from a checkpoint directory can execute.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from tttexp.errors import CheckpointError
from tttexp.training.durable import fsync_dir, fsync_file

SUFFIX = ".dcp"
MARKER = "COMPLETE"
TRAINER_FILE = "trainer.pt"


def is_sharded(path: Path) -> bool:
    """Is ``path`` a sharded checkpoint directory (named ``*.dcp``, or holding DCP's ``.metadata``)?"""
    path = Path(path)
    return path.suffix == SUFFIX or (path / ".metadata").exists()


# --------------------------------------------------------------------------------------------------------------
# Safe reading
# --------------------------------------------------------------------------------------------------------------

_ALLOWED_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                 "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.planner", "_Checkpointable"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # looks a layout up by name in a table of torch.layout values
    ("pathlib", "PosixPath"),  # the checkpoint id DCP records; a path object does nothing when built
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
}
_TORCH_VALUE_TYPES = (torch.dtype, torch.layout, torch.memory_format)


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata``: its dataclasses, torch dtypes/layouts/sizes and plain values; anything
    else (a function, a class from elsewhere) is refused before it is looked up."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), _TORCH_VALUE_TYPES):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


def read_metadata(path: Path) -> Any:
    """DCP's ``Metadata`` of a checkpoint directory, read through :class:`MetadataUnpickler`."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with open(Path(path) / ".metadata", "rb") as fh:
            metadata = MetadataUnpickler(io.BytesIO(fh.read())).load()
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path}: unreadable or refused metadata ({str(err)[:160]})") from err
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"checkpoint {path}: its .metadata is not DCP metadata")
    return metadata


def _safe_reader(path: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            metadata = read_metadata(Path(self.path))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(path)


def _safe_planner() -> Any:
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class TensorsOnlyPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: Any) -> None:
            raise CheckpointError(f"checkpoint entry {read_item.dest_index.fqn} is not a tensor; refusing it")

    return TensorsOnlyPlanner()


def load_trainer_state(path: Path) -> dict[str, Any]:
    """``trainer.pt`` of a complete checkpoint directory (tensors and plain values only)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not (path / MARKER).is_file():
        raise CheckpointError(f"checkpoint {path} is not complete (its save was interrupted)")
    try:
        state = torch.load(path / TRAINER_FILE, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - every failure to read becomes one line
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise CheckpointError(f"checkpoint {path} holds more than tensors and plain values; refusing it") from err
        raise CheckpointError(f"checkpoint {path} is damaged ({str(err).strip().splitlines()[0][:120]})") from err
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"checkpoint {path} is not a tttexp checkpoint (no step entry)")
    return {**state, "format": "dcp", "path": str(path)}


def is_complete(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


# --------------------------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------------------------


def model_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Global shapes of the model's state (a sharded parameter counts with its full shape)."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def check_fits(source: str, saved: dict[str, tuple[int, ...]], model: nn.Module, saved_config: dict | None) -> None:
    """One-line CheckpointError when the checkpoint's model is not this run's, naming both shapes."""
    here = model_shapes(model)
    problem = None
    for name, shape in here.items():
        if name not in saved:
            problem = f"{name} is missing from it"
        elif tuple(saved[name]) != shape:
            problem = f"{name} is {list(saved[name])} there and {list(shape)} here"
        if problem:
            break
    if problem is None:
        extra = sorted(set(saved) - set(here))
        if not extra:
            return
        problem = f"it has {extra[0]}, which this model lacks"
    config = getattr(model, "config", None)
    theirs = _shape_text(saved_config) if saved_config else "unknown"
    ours = _shape_text(config.to_dict()) if config is not None else "unknown"
    raise CheckpointError(f"checkpoint {source} is a different model shape ({theirs}) from this run's ({ours}): "
                          f"{problem}; pass the run's model options")


def _shape_text(config: dict) -> str:
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
            "ttt_layer")
    return " ".join(f"{k.replace('num_', '').replace('_size', '')}={config.get(k)}" for k in keys if k in config)


def saved_model_shapes(metadata: Any) -> dict[str, tuple[int, ...]]:
    prefix = "model."
    return {k[len(prefix):]: tuple(v.size) for k, v in metadata.state_dict_metadata.items()
            if k.startswith(prefix) and hasattr(v, "size")}


# --------------------------------------------------------------------------------------------------------------
# Save and load
# --------------------------------------------------------------------------------------------------------------


class ShardedCheckpointer:
    """Writes and reads DCP checkpoints of one run; with ``async_save`` the tensors are written in the
    background and the checkpoint is marked complete when the write has finished (at the next save or at
    :meth:`wait`)."""

    def __init__(self, layout: Any, async_save: bool = False) -> None:
        self.layout = layout
        self.async_save = async_save
        self._pending: tuple[Any, Path, int] | None = None
        self._group = None

    def save(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any],
             keep_last: int, prune: Any) -> Path:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemWriter
        from torch.distributed.checkpoint.state_dict import get_state_dict

        self.wait()
        main = self.layout.is_main
        if main:
            if path.exists():  # a save of this step that did not finish
                shutil.rmtree(path)
            path.mkdir(parents=True)
        self.layout.barrier()
        model_state, optim_state = get_state_dict(model, optimizer)
        tensors = {"model": model_state, "optim": optim_state["state"]}
        state = {**trainer_state, "param_groups": optim_state["param_groups"]}
        try:
            if main:
                _atomic_torch_save(state, path / TRAINER_FILE)
            writer = FileSystemWriter(path, thread_count=1)
            if self.async_save and dist.is_initialized():
                if self._group is None:
                    self._group = dist.new_group(backend="gloo")
                future = dcp.async_save(tensors, storage_writer=writer, process_group=self._group)
                self._pending = (future, path, keep_last, prune)
                return path
            with _one_process_is_fine():
                dcp.save(tensors, storage_writer=writer, no_dist=not dist.is_initialized())
        except (OSError, RuntimeError, CheckpointException) as err:
            raise CheckpointError(f"could not write checkpoint {path}: {_reason(err)}") from err
        self._complete(path, keep_last, prune)
        return path

    def wait(self) -> None:
        """Finish a background save: wait for its shards, then mark it complete."""
        if self._pending is None:
            return
        future, path, keep_last, prune = self._pending
        self._pending = None
        result = future.result() if hasattr(future, "result") else future.upload_completion.result()
        del result
        self._complete(path, keep_last, prune)

    def _complete(self, path: Path, keep_last: int, prune: Any) -> None:
        if self.layout.is_main:
            tmp = path / f".{MARKER}.tmp"
            tmp.write_text("complete\n")
            fsync_file(tmp)
            os.replace(tmp, path / MARKER)
            fsync_dir(path)
            prune(keep_last)
        if not self.async_save:
            self.layout.barrier()

    def load(self, state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        """Read a complete checkpoint (``state`` from :func:`load_trainer_state`) into ``model`` and
        ``optimizer``, whatever their sharding."""
        load_into(Path(state["path"]), model, optimizer, state)


def load_into(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
              trainer_state: dict[str, Any] | None = None) -> None:
    """Read the model (and the optimizer, if given) from a checkpoint directory; works on one process without a
    process group, and on any world size with one (each process reads the slices it holds)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    path = Path(path)
    trainer_state = trainer_state if trainer_state is not None else load_trainer_state(path)
    metadata = read_metadata(path)
    check_fits(str(path), saved_model_shapes(metadata), model, trainer_state.get("model_config"))
    options = StateDictOptions(strict=True)
    if optimizer is None:
        model_state = get_model_state_dict(model)
        tensors = {"model": model_state}
    else:
        model_state, optim_state = get_state_dict(model, optimizer)
        tensors = {"model": model_state, "optim": optim_state["state"]}
    try:
        with _one_process_is_fine():
            dcp.load(tensors, storage_reader=_safe_reader(path), planner=_safe_planner(),
                     no_dist=not dist.is_initialized())
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - DCP wraps errors (ours too) in its own type
        raise CheckpointError(f"checkpoint {path} could not be read ({_reason(err)})") from err
    if optimizer is None:
        set_model_state_dict(model, tensors["model"], options=options)
        return
    optim = {"state": tensors["optim"], "param_groups": trainer_state["param_groups"]}
    set_state_dict(model, optimizer, model_state_dict=tensors["model"], optim_state_dict=optim, options=options)


def full_model_state(path: Path, model: nn.Module) -> None:
    """Load only the model of a checkpoint directory into a plain (unsharded) ``model``; for export and eval."""
    load_into(path, model, None)


def _reason(err: BaseException) -> str:
    """One line for a failed DCP call: the first failure of the first failing rank (DCP gathers them)."""
    failures = getattr(err, "failures", None)
    if failures:
        err = next(iter(failures.values()))[0]
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(err).__name__


@contextlib.contextmanager
def _one_process_is_fine():
    """DCP warns on every call without a process group; one process reading or writing everything is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _atomic_torch_save(state: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)

