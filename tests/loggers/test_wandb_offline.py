"""Real offline wandb sessions, read back from the ``.wandb`` files they wrote."""

import json
import logging
import math
from pathlib import Path

import pytest

from tttexp.loggers import JsonlLogger, LoggerGroup, WandbLogger, find_run_files, read_metrics, read_run

CONFIG = {
    "model": {"name": "ttt-linear", "hidden_size": 64, "num_layers": 2, "ttt": {"layer": "linear", "mini_batch": 16}},
    "optim": {"lr": 3e-4, "betas": [0.9, 0.95]},
    "seed": 7,
}
FACTS = {
    "model/total_parameters": 123456,
    "model/hidden_size": 64,
    "model/num_layers": 2,
    "model/ttt_layer": "linear",
    "model/state_passing": True,
    "world_size": 1,
    "device": "cpu",
    "git_commit": "0a0eab4",
}
SUMMARY = {"summary/total_time": 12.5, "summary/avg_tokens_per_sec": 8123.0, "summary/final_loss": 2.25}


def train_metrics(step: int) -> dict[str, float | int]:
    return {
        "train/loss": 10.0 / (1 + step) + 2.0,
        "train/learning_rate": 3e-4 * min(1.0, step / 5),
        "train/tokens_per_sec": 8000.0 + step,
        "train/grad_norm": 1.0 / math.sqrt(step),
        "train/tokens_seen": 4096 * step,
        "train/step_time_ms": 512.5,
        "system/gpu_memory_allocated": 0.0,
        "system/num_processes": 1,
        "system/mfu": 0.31,
        "state/w_norm": 3.0 + 0.01 * step,
        "state/resets": step % 3,
        "warnings/loss_spike": 0,
    }


def _our_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tttexp.loggers"]


def _comparable(history: list[dict]) -> list[dict]:
    """History rows of plain ``log`` calls (text and table rows hold media dicts)."""
    return [row for row in history if not any(isinstance(value, dict) for value in row.values())]


def test_offline_session_round_trips(wandb_env: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    run_dir = wandb_env / "run"
    wandb_logger = WandbLogger(run_name="unit", group="tests", tags=["unit", "cpu"], notes="n", job_type="train")
    group = LoggerGroup([JsonlLogger(), wandb_logger])  # mode auto, no credentials: offline
    group.start(run_dir, CONFIG, FACTS)
    assert wandb_logger.active
    for step in range(1, 21):
        group.log(train_metrics(step), step=step)
        if step % 10 == 0:
            group.log({"val/loss": 2.5 - step / 100, "val/ppl": math.exp(2.5 - step / 100)}, step=step)
            group.log_text("samples/generation", f"sample at step {step}: once upon a time", step=step)
    group.log_table("eval/tasks", ["task", "accuracy"], [["copy", 0.75], ["recall", 0.5]], step=20)
    group.alert("loss spike", "train/loss jumped at step 12")
    group.finish(SUMMARY)

    (path,) = find_run_files(run_dir)
    run = read_run(path)
    assert run.run_id == wandb_logger.run_id == (run_dir / "wandb_run_id").read_text().strip()
    assert path.parent == wandb_logger.sync_dir and path.parent.name.startswith("offline-run-")
    assert run.exit_code == 0

    jsonl = read_metrics(run_dir / "metrics.jsonl")
    history = _comparable(run.history)
    assert len(jsonl) == len(history) == 1 + 20 + 2  # model facts at step 0, train steps, val steps
    for record, row in zip(jsonl, history, strict=True):
        assert row["train/step"] == record["step"]
        for key, value in record.items():
            if key != "step":
                assert row[key] == value, (record["step"], key)
    assert history[0]["train/step"] == 0 and history[0]["model/ttt_layer"] == "linear"

    for key, value in CONFIG.items():
        assert run.config[key] == value
    for key, value in FACTS.items():
        assert run.config[key] == value
    for key, value in {**SUMMARY, **{k: v for k, v in FACTS.items() if k.startswith("model/")}}.items():
        assert run.summary[key] == value
    assert run.summary["train/step"] == 20

    definitions = {d["name"]: d["step_metric"] for d in run.metric_definitions}
    for prefix in ("train", "val", "system", "state", "inference", "warnings", "model"):
        assert definitions[f"{prefix}/*"] == "train/step"
    assert [(a["title"], a["level"]) for a in run.alerts] == [("loss spike", "WARN")]

    text_row = [row for row in run.history if "samples/generation" in row][-1]
    table_file = path.parent / "files" / text_row["samples/generation"]["path"]
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["step", "text"]
    assert table["data"] == [[10, "sample at step 10: once upon a time"], [20, "sample at step 20: once upon a time"]]
    eval_row = [row for row in run.history if "eval/tasks" in row][-1]
    assert json.loads((path.parent / "files" / eval_row["eval/tasks"]["path"]).read_text())["data"] == [
        ["copy", 0.75],
        ["recall", 0.5],
    ]

    (line,) = _our_lines(caplog)
    assert f"wandb sync {path.parent}" in line


def test_failed_run_then_resume_continues_the_same_run(wandb_env: Path) -> None:
    run_dir = wandb_env / "run"
    first = LoggerGroup([JsonlLogger(), WandbLogger(mode="offline")])
    first.start(run_dir, CONFIG, FACTS)
    for step in range(1, 11):
        first.log(train_metrics(step), step=step)
    first.finish({"summary/final_loss": 2.9}, failed=True)  # e.g. the job was preempted

    resumed = WandbLogger(mode="offline")
    second = LoggerGroup([JsonlLogger(), resumed])
    second.start(run_dir, CONFIG, FACTS)
    for step in range(6, 16):  # restarted from the checkpoint of step 5: steps 6-10 come again
        second.log(train_metrics(step), step=step)
    second.finish(SUMMARY)

    old, new = (read_run(path) for path in find_run_files(run_dir))
    assert old.run_id == new.run_id == resumed.run_id
    assert old.exit_code == 1 and new.exit_code == 0
    assert [row["train/step"] for row in _comparable(new.history)] == [0, *range(6, 16)]
    assert [row["train/loss"] for row in _comparable(new.history)[1:]] == [
        train_metrics(step)["train/loss"] for step in range(6, 16)
    ]
    assert new.summary["summary/final_loss"] == SUMMARY["summary/final_loss"]
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [0, *range(1, 11), 0, *range(6, 16)]


def test_an_error_after_start_turns_wandb_off_with_one_line(wandb_env: Path, caplog: pytest.LogCaptureFixture) -> None:
    import wandb

    caplog.set_level(logging.WARNING)
    run_dir = wandb_env / "run"
    wandb_logger = WandbLogger(mode="offline")
    group = LoggerGroup([JsonlLogger(), wandb_logger])
    group.start(run_dir, CONFIG, FACTS)
    group.log(train_metrics(1), step=1)
    caplog.clear()
    wandb.finish()  # the run ends behind the logger's back: every later wandb call raises
    for step in range(2, 6):
        group.log(train_metrics(step), step=step)
    group.log_text("samples/generation", "text", step=5)
    group.log_table("eval/tasks", ["a"], [[1]], step=5)
    group.alert("title", "text")
    group.finish(SUMMARY)

    (line,) = _our_lines(caplog)
    assert "wandb logging is off after an error in log()" in line and "UsageError" in line
    assert not wandb_logger.active and len(group.loggers) == 2
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [0, 1, 2, 3, 4, 5]
    assert (run_dir / "summary.json").is_file()


def test_other_ranks_and_disabled_mode_leave_no_trace(wandb_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for rank, mode in (("1", "offline"), ("0", "disabled")):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "2")
        run_dir = wandb_env / f"run-{rank}-{mode}"
        logger = WandbLogger(mode=mode)
        logger.start(run_dir, CONFIG, FACTS)
        logger.log(train_metrics(1), step=1)
        logger.log_text("samples/generation", "text", step=1)
        logger.alert("t", "x")
        logger.finish(SUMMARY)
        assert not logger.active and not run_dir.exists()
