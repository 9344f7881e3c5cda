"""The app end to end, in a subprocess, as a user runs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SMOKE = ["experiment=smoke", "logging=none"]


def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("metrics.jsonl"))


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_logging_none_runs_with_wandb_unimportable(run_app, tmp_path):
    blocker = tmp_path / "no_wandb"
    (blocker / "wandb").mkdir(parents=True)
    marker = tmp_path / "wandb-was-imported"
    (blocker / "wandb" / "__init__.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nraise ImportError('wandb is blocked for this test')\n")
    out = run_app(*SMOKE, f"hydra.run.dir={tmp_path}/run", python_path=str(blocker))
    assert out.returncode == 0, out.stderr[-3000:]
    assert not marker.exists(), "logging=none must not even try to import wandb"
    run = tmp_path / "run"
    for name in (".hydra/config.yaml", "metrics.jsonl", "summary.json"):
        assert (run / name).exists(), name
    assert list((run / "checkpoints").glob("step-*.pt"))
    rows = records(run)
    assert any("train/loss" in r for r in rows) and any("val/loss" in r for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["summary/steps"] == 6
    assert not (run / "wandb").exists()
    log = (run / "train.log").read_text()  # the console's step lines and summary table are in the log too
    assert [line for line in out.stdout.splitlines() if line.startswith("step ")] == \
        [line for line in log.splitlines() if line.startswith("step ")] != []
    assert "final_val_loss" in log and f"run directory: {run}" in log


# A multirun's directories, one per job: tests/app/test_wandb_app.py::test_multirun_jobs_are_runs_of_one_group.


def test_bad_input_exits_nonzero_with_one_line_before_building(run_app, tmp_path):
    """The process contract (exit status 2, one line, no run directory); the messages of every kind of mistake
    are checked in-process in test_config.py."""
    out = run_app("trainer.max_stepz=3", f"hydra.run.dir={tmp_path}/run", timeout=120)
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_default_run_learns_and_writes_its_run_directory(run_app, tmp_path):
    out = run_app(f"hydra.run.dir={tmp_path}/run", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "run"
    vals = [r["val/loss"] for r in records(run) if "val/loss" in r]
    assert len(vals) >= 2 and vals[-1] < vals[0] - 0.5, vals
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert (run / "summary.json").exists() and (run / ".hydra" / "config.yaml").exists()
