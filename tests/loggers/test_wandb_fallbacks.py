"""Logging never stops training: no wandb, or a wandb that cannot reach its server."""

import logging
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tttexp.loggers import JsonlLogger, LoggerGroup, WandbLogger, read_metrics

SCRIPT = """
import sys
sys.modules["wandb"] = None  # as if wandb were not installed
from pathlib import Path
from tttexp.loggers import JsonlLogger, LoggerGroup, WandbLogger

group = LoggerGroup([JsonlLogger(), WandbLogger(mode="offline")])
group.start(Path(sys.argv[1]), {"a": 1}, {"model/hidden_size": 8})
for step in range(1, 6):
    group.log({"train/loss": 1.0 / step}, step=step)
group.log_text("samples/generation", "text", step=5)
group.alert("title", "text")
group.finish({"summary/final_loss": 0.2})
print("trained")
"""


def test_wandb_not_importable(tmp_path: Path) -> None:
    env = {**os.environ, "HOME": str(tmp_path), "RANK": "0"}
    script = textwrap.dedent(SCRIPT)
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "run")], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "trained"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "wandb cannot be imported" in lines[0], result.stderr
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [0, 1, 2, 3, 4, 5]
    assert (tmp_path / "run" / "summary.json").is_file()
    assert not (tmp_path / "run" / "wandb").exists()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_server_falls_back_to_a_no_op(
    wandb_env: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)  # a dummy key: the server is never reached anyway
    run_dir = wandb_env / "run"
    wandb_logger = WandbLogger(mode="online", init_timeout=3)
    group = LoggerGroup([JsonlLogger(), wandb_logger])

    began = time.monotonic()
    group.start(run_dir, {"a": 1}, {"model/hidden_size": 8})
    assert time.monotonic() - began < 30
    for step in range(1, 6):
        group.log({"train/loss": 1.0 / step}, step=step)
    group.log_text("samples/generation", "text", step=5)
    group.alert("title", "text")
    group.finish({"summary/final_loss": 0.2})

    ours = [r.getMessage() for r in caplog.records if r.name == "tttexp.loggers"]
    assert len(ours) == 1 and "wandb.init (online) failed" in ours[0] and "\n" not in ours[0]
    assert not wandb_logger.active and len(group.loggers) == 2
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [0, 1, 2, 3, 4, 5]
    assert (run_dir / "summary.json").is_file()
