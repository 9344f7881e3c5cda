"""The ``.wandb`` reader against files that wandb itself wrote, including records spanning blocks."""

import random
import shutil
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tttexp.loggers import WandbLogger, find_run_files, read_records, read_run
from tttexp.loggers.wandb_records import BLOCK_SIZE, WandbFormatError, read_payloads

LONG_TEXT = "".join(chr(ord("a") + i % 26) for i in range(100_000))  # three blocks and more


@pytest.fixture(scope="module")
def wandb_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("records")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("WANDB_API_KEY", raising=False)
        patch.delenv("RANK", raising=False)
        patch.setenv("HOME", str(root))
        patch.setenv("WANDB_SILENT", "true")
        patch.setenv("WANDB_CONFIG_DIR", str(root / "config"))
        patch.setenv("WANDB_CACHE_DIR", str(root / "cache"))
        patch.setenv("WANDB_DATA_DIR", str(root / "data"))
        logger = WandbLogger(mode="offline")
        logger.start(root / "run", {"a": 1}, {})
        logger.log({"train/loss": 1.5, "train/note": LONG_TEXT}, step=1)
        logger.log({"train/loss": float("nan"), "train/grad_norm": float("inf")}, step=2)
        logger.finish({"summary/final_loss": 1.5})
    (path,) = find_run_files(root / "run")
    yield path


def test_file_header_and_checksums(wandb_file: Path) -> None:
    data = wandb_file.read_bytes()
    assert data[:7] == b":W&B\xe1\xbe\x00"
    crc, length, kind = struct.unpack_from("<IHB", data, 7)
    assert kind == 1  # the first record (the header record) fits one chunk
    assert crc == zlib.crc32(bytes([kind]) + data[14 : 14 + length])


def test_records_spanning_blocks_are_reassembled(wandb_file: Path) -> None:
    assert wandb_file.stat().st_size > 3 * BLOCK_SIZE
    assert max(len(p) for p in read_payloads(wandb_file)) > BLOCK_SIZE
    run = read_run(wandb_file)
    rows = [row for row in run.history if "train/loss" in row]
    assert rows[0]["train/note"] == LONG_TEXT and rows[0]["train/loss"] == 1.5
    assert rows[1]["train/loss"] != rows[1]["train/loss"] and rows[1]["train/grad_norm"] == float("inf")
    assert run.summary["summary/final_loss"] == 1.5 and run.config["a"] == 1
    kinds = [record.WhichOneof("record_type") for record in read_records(wandb_file)]
    assert kinds[0] == "header" and kinds[1] == "run" and "exit" in kinds


def test_corruption_is_detected(wandb_file: Path, tmp_path: Path) -> None:
    broken = tmp_path / "run-broken.wandb"
    data = bytearray(wandb_file.read_bytes())
    data[BLOCK_SIZE + 100] ^= 0xFF  # inside the payload that continues into the second block
    broken.write_bytes(bytes(data))
    with pytest.raises(WandbFormatError, match="checksum mismatch"):
        list(read_payloads(broken))

    broken.write_bytes(b"LEVELDB" + bytes(data[7:]))
    with pytest.raises(WandbFormatError, match="not a wandb transaction log"):
        list(read_payloads(broken))


def test_a_file_cut_short_reads_up_to_the_cut(wandb_file: Path, tmp_path: Path) -> None:
    cut = tmp_path / "run-cut.wandb"
    shutil.copyfile(wandb_file, cut)
    with cut.open("r+b") as handle:
        handle.truncate(2 * BLOCK_SIZE + 10)  # in the middle of the long record
    run = read_run(cut)
    assert run.exit_code is None  # no exit record: the run did not end
    assert run.config["a"] == 1 and not any("train/note" in row for row in run.history)


def test_find_run_files_orders_same_second_restarts(tmp_path: Path) -> None:
    for name in ("offline-run-20250102_030405-abc-1", "offline-run-20250102_030405-abc", "run-20250101_000000-abc"):
        (tmp_path / "wandb" / name).mkdir(parents=True)
        (tmp_path / "wandb" / name / "run-abc.wandb").touch()
    (tmp_path / "wandb" / "latest-run").mkdir()
    assert [p.parent.name for p in find_run_files(tmp_path)] == [
        "run-20250101_000000-abc",
        "offline-run-20250102_030405-abc",
        "offline-run-20250102_030405-abc-1",
    ]


def test_many_block_boundaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Thousands of records of random sizes: the framing holds at every block end, including the short
    zero trailers a block gets when fewer than 7 bytes are left."""
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    rng = random.Random(0)
    sizes = [rng.randint(0, 400) for _ in range(3000)]
    logger = WandbLogger(mode="offline")
    logger.start(tmp_path / "run", {}, {})
    for step, size in enumerate(sizes):
        logger.log({"train/note": "y" * size}, step=step)
    logger.finish({})
    (path,) = find_run_files(tmp_path / "run")

    data = path.read_bytes()
    assert len(data) > 50 * BLOCK_SIZE
    pos, trailers = 7, []
    while pos < len(data):  # walk the chunk headers only, to look at every block end
        left = BLOCK_SIZE - pos % BLOCK_SIZE
        if left < 7:
            trailers.append(data[pos : pos + left])
            pos += left
            continue
        pos += 7 + struct.unpack_from("<IHB", data, pos)[1]
    assert all(trailer == bytes(len(trailer)) for trailer in trailers)

    rows = [row for row in read_run(path).history if "train/note" in row]
    assert [len(row["train/note"]) for row in rows] == sizes
    assert [row["train/step"] for row in rows] == list(range(len(sizes)))
