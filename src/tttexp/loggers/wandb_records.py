"""A reader for wandb's transaction log (``run-<id>.wandb``), written from the file format.

Layout, as written by wandb 0.31 (the same framing as LevelDB's log, with a different checksum):

* a 7-byte file header: the ASCII ident ``:W&B``, a little-endian uint16 magic ``0xBEE1``
  (bytes ``E1 BE``) and a uint8 format version ``0``;
* then the file is cut into 32 KiB blocks counted from offset 0, so the header sits in the first block.
  A block holds chunks: a 7-byte chunk header (uint32 LE checksum, uint16 LE payload length, uint8 type)
  and the payload. A chunk never crosses a block end; when fewer than 7 bytes are left in a block they
  are zero padding. Type 1 is FULL (a whole record), 2 FIRST, 3 MIDDLE and 4 LAST pieces of a record
  that spans blocks;
* the checksum is the plain CRC-32 (IEEE, ``zlib.crc32``) of the type byte followed by the payload,
  not LevelDB's masked CRC-32C;
* every reassembled record is one protobuf ``Record`` of ``wandb.proto.wandb_internal_pb2``.

A chunk cut short at the end of the file (a process killed mid-write) ends the iteration quietly; a bad
checksum or a broken chunk sequence raises ``WandbFormatError``.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wandb.proto.wandb_internal_pb2 import Record

IDENT = b":W&B"
MAGIC = 0xBEE1
VERSION = 0
FILE_HEADER = struct.Struct("<4sHB")
CHUNK_HEADER = struct.Struct("<IHB")
BLOCK_SIZE = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class WandbFormatError(ValueError):
    """The file is not a wandb transaction log, or it is corrupt."""


def read_payloads(path: str | Path) -> Iterator[bytes]:
    """The serialized records of a ``.wandb`` file, checksums verified."""
    path = Path(path)
    with path.open("rb") as handle:
        block = handle.read(BLOCK_SIZE)
        if len(block) < FILE_HEADER.size:
            raise WandbFormatError(f"{path}: too short for a wandb file header")
        ident, magic, version = FILE_HEADER.unpack_from(block)
        if ident != IDENT or magic != MAGIC:
            raise WandbFormatError(f"{path}: not a wandb transaction log (header {block[:7].hex()})")
        if version != VERSION:
            raise WandbFormatError(f"{path}: unsupported wandb log version {version}")
        pos, block_start = FILE_HEADER.size, 0
        pending: bytearray | None = None
        while block:
            while pos + CHUNK_HEADER.size <= len(block):
                crc, length, kind = CHUNK_HEADER.unpack_from(block, pos)
                if kind == 0 and length == 0:
                    break  # zero fill up to the end of the block
                end = pos + CHUNK_HEADER.size + length
                if end > len(block):
                    if len(block) < BLOCK_SIZE:
                        return  # the last chunk was cut short
                    raise WandbFormatError(f"{path}: chunk at offset {block_start + pos} crosses a block end")
                payload = block[pos + CHUNK_HEADER.size : end]
                if zlib.crc32(bytes([kind]) + payload) != crc:
                    raise WandbFormatError(f"{path}: checksum mismatch at offset {block_start + pos}")
                pending = _assemble(pending, kind, payload, path, block_start + pos)
                pos = end
                if kind == FULL:
                    yield payload
                elif kind == LAST and pending is not None:
                    yield bytes(pending)
                    pending = None
            block_start += len(block)
            block, pos = handle.read(BLOCK_SIZE), 0


def _assemble(pending: bytearray | None, kind: int, payload: bytes, path: Path, offset: int) -> bytearray | None:
    if kind == FULL:
        if pending is not None:
            raise WandbFormatError(f"{path}: FULL chunk inside a split record at offset {offset}")
        return None
    if kind == FIRST:
        if pending is not None:
            raise WandbFormatError(f"{path}: FIRST chunk inside a split record at offset {offset}")
        return bytearray(payload)
    if kind in (MIDDLE, LAST):
        if pending is None:
            raise WandbFormatError(f"{path}: continuation chunk without a FIRST at offset {offset}")
        pending.extend(payload)
        return pending
    raise WandbFormatError(f"{path}: unknown chunk type {kind} at offset {offset}")


def read_records(path: str | Path) -> Iterator[Record]:
    """Every ``Record`` of a ``.wandb`` file, in order."""
    from wandb.proto.wandb_internal_pb2 import Record

    for payload in read_payloads(path):
        record = Record()
        record.ParseFromString(payload)
        yield record


@dataclass
class RunRecord:
    """What a ``.wandb`` file says about its run. ``exit_code`` is None when the file has no exit record
    (the process died, or the run is still going)."""

    run_id: str = ""
    project: str = ""
    producer: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    alerts: list[dict[str, str]] = field(default_factory=list)
    metric_definitions: list[dict[str, str]] = field(default_factory=list)
    exit_code: int | None = None


def read_run(path: str | Path) -> RunRecord:
    """Replay a ``.wandb`` file into config, history rows, final summary, alerts and exit code.

    Values are decoded from their ``value_json``; keys logged as nested dicts come back nested.
    """
    run = RunRecord()
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "header":
            run.producer = record.header.version_info.producer
        elif kind == "run":
            run.run_id, run.project = record.run.run_id, record.run.project
            _apply(run.config, record.run.config.update, ())
            _apply(run.summary, record.run.summary.update, ())
        elif kind == "config":
            _apply(run.config, record.config.update, record.config.remove)
        elif kind == "summary":
            _apply(run.summary, record.summary.update, record.summary.remove)
        elif kind == "history":
            row: dict[str, Any] = {}
            _apply(row, record.history.item, ())
            if record.history.HasField("step"):
                row.setdefault("_step", record.history.step.num)
            run.history.append(row)
        elif kind == "alert":
            alert = record.alert
            run.alerts.append({"title": alert.title, "text": alert.text, "level": alert.level})
        elif kind == "metric":
            metric = record.metric
            name = metric.name or metric.glob_name
            run.metric_definitions.append({"name": name, "step_metric": metric.step_metric})
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run


def _key_path(item: Any) -> Sequence[str]:
    return [item.key] if item.key else list(item.nested_key)


def _apply(target: dict[str, Any], updates: Iterable[Any], removes: Iterable[Any]) -> None:
    for item in updates:
        *parents, last = _key_path(item)
        node = target
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = json.loads(item.value_json)
    for item in removes:
        *parents, last = _key_path(item)
        node = target
        for key in parents:
            child = node.get(key)
            node = child if isinstance(child, dict) else {}
        node.pop(last, None)


_RUN_DIR = re.compile(r"^(?:offline-)?run-(\d{8}_\d{6})-(.+)$")


def find_run_files(run_dir: str | Path) -> list[Path]:
    """The ``.wandb`` files under ``run_dir/wandb/`` (offline and online runs), oldest first.

    wandb names a run's directory ``[offline-]run-<YYYYmmdd_HHMMSS>-<id>`` and adds ``-1``, ``-2`` ... when
    a second start of the same id falls in the same second.
    """
    found: list[tuple[str, int, str, Path]] = []
    for path in Path(run_dir).glob("wandb/*run-*/run-*.wandb"):
        match = _RUN_DIR.match(path.parent.name)
        if match is None:
            continue
        stamp, rest = match.groups()
        run_id = path.stem[len("run-") :]
        suffix = rest[len(run_id) + 1 :] if rest.startswith(run_id + "-") else ""
        found.append((stamp, int(suffix) if suffix.isdigit() else 0, path.parent.name, path))
    return [path for *_, path in sorted(found)]
