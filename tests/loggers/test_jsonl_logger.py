import json
from pathlib import Path

import pytest

from tttexp.loggers import JsonlLogger, Logger, NullLogger, read_jsonl, read_metrics

FACTS = {"model/hidden_size": 32, "model/ttt_layer": "linear", "world_size": 1, "device": Path("/dev/x")}


def test_loggers_satisfy_the_protocol() -> None:
    assert isinstance(JsonlLogger(), Logger)
    assert isinstance(NullLogger(), Logger)


def test_null_logger_accepts_everything(tmp_path: Path) -> None:
    logger = NullLogger()
    logger.start(tmp_path, {"a": 1}, FACTS)
    logger.log({"train/loss": 1.0}, step=1)
    logger.log_text("t", "x", 1)
    logger.log_table("t", ["a"], [[1]], 1)
    logger.log_image("i", tmp_path / "none.png", 1)
    logger.alert("a", "b")
    logger.finish({}, failed=True)
    assert list(tmp_path.iterdir()) == []


def test_records_are_on_disk_before_finish(tmp_path: Path) -> None:
    logger = JsonlLogger()
    logger.start(tmp_path, {"a": 1}, FACTS)
    for step in range(1, 4):
        logger.log({"train/loss": 1.0 / step, "train/tokens_seen": 100 * step}, step=step)
    logger.log_text("samples/generation", "hello\nworld", step=3)
    logger.log_table("eval/results", ["task", "acc"], [("copy", 0.5), ("recall", 0.25)], step=3)
    logger.log_image("plots/loss", tmp_path / "loss.png", step=3)
    logger.alert("loss spike", "at step 3")
    logger.log({"train/loss": float("nan")}, step=4)

    records = list(read_jsonl(tmp_path / "metrics.jsonl"))  # the file is still open
    assert records[0]["_type"] == "start" and records[0]["appended"] is False
    assert records[0]["facts"]["device"] == "/dev/x"
    assert records[1] == {"step": 0, "model/hidden_size": 32, "model/ttt_layer": "linear"}
    assert records[2] == {"step": 1, "train/loss": 1.0, "train/tokens_seen": 100}
    by_type = {r["_type"]: r for r in records if "_type" in r}
    assert by_type["text"] == {"_type": "text", "step": 3, "key": "samples/generation", "text": "hello\nworld"}
    assert by_type["table"]["rows"] == [["copy", 0.5], ["recall", 0.25]]
    assert by_type["table"]["columns"] == ["task", "acc"]
    assert by_type["image"]["path"] == str(tmp_path / "loss.png")
    assert by_type["alert"]["title"] == "loss spike"
    assert records[-1]["step"] == 4 and records[-1]["train/loss"] != records[-1]["train/loss"]  # NaN kept

    logger.finish({"summary/final_loss": 0.25, "summary/total_time": 12.5})
    assert json.loads((tmp_path / "summary.json").read_text()) == {
        "summary/final_loss": 0.25,
        "summary/total_time": 12.5,
    }
    assert list(read_jsonl(tmp_path / "metrics.jsonl"))[-1]["_type"] == "finish"
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3, 4]


def test_resume_appends_and_survives_a_torn_line(tmp_path: Path) -> None:
    first = JsonlLogger("logs/metrics.jsonl")
    first.start(tmp_path, {}, {})
    first.log({"train/loss": 2.0}, step=1)
    path = tmp_path / "logs" / "metrics.jsonl"
    with path.open("a") as handle:
        handle.write('{"step": 2, "train/lo')  # the process died mid-line

    second = JsonlLogger("logs/metrics.jsonl")
    second.start(tmp_path, {}, {})
    second.log({"train/loss": 1.5}, step=2)
    second.finish({"summary/final_loss": 1.5}, failed=True)

    records = list(read_jsonl(path))
    assert [r.get("appended") for r in records if r.get("_type") == "start"] == [False, True]
    assert read_metrics(path) == [{"step": 1, "train/loss": 2.0}, {"step": 2, "train/loss": 1.5}]
    assert records[-1]["failed"] is True
    assert (tmp_path / "logs" / "summary.json").is_file()


def test_other_ranks_write_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    logger = JsonlLogger()
    logger.start(tmp_path, {}, FACTS)
    logger.log({"train/loss": 1.0}, step=1)
    logger.finish({"summary/final_loss": 1.0})
    assert list(tmp_path.iterdir()) == []


def test_log_before_start_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(RuntimeError, match="before start"):
        JsonlLogger(tmp_path / "m.jsonl").log({"train/loss": 1.0}, step=1)
