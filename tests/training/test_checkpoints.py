"""Checkpoints: atomic, newest-valid, data-only; exact resume after kill -9; preemption; eval; plots."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from support import exit_code_of_the_app, last_by_step
from tttexp.errors import CheckpointError
from tttexp.training.checkpoint import list_checkpoints, load_checkpoint, prune_checkpoints, save_checkpoint

FAST = ["experiment=smoke", "logging=none", "trainer.log_every=1", "trainer.eval_every=0",
        "trainer.position_eval_sequences=0", "trainer.plots=false"]


def start(app_cache: Path, cwd: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "TTTEXP_CACHE_DIR": str(app_cache), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "tttexp.train", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.stderr.read()[-2000:]}")
        if (run / "metrics.jsonl").exists() and max(last_by_step(run, "train/loss"), default=0) >= step:
            return
        time.sleep(0.2)
    raise AssertionError("the run did not reach the step in time")


@pytest.mark.parametrize("recipe", [["strategy=conservative"],
                                    ["strategy=multi_gpu_state_passing", "distributed.nproc_per_node=1"]])
def test_kill_9_then_resume_gives_the_uninterrupted_loss_curve(run_app, app_cache, tmp_path, recipe):
    steps = [*FAST, *recipe, "trainer.max_steps=40", "trainer.ckpt_every=5", "trainer.keep_last=2"]
    ref = start(app_cache, tmp_path, *steps, f"hydra.run.dir={tmp_path}/ref")  # beside the killed run
    run = tmp_path / "killed"
    proc = start(app_cache, tmp_path, *steps, f"hydra.run.dir={run}")
    try:
        wait_for_step(run, 12, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert ref.wait(timeout=300) == 0, ref.stderr.read()[-3000:]
    finally:
        for p in (proc, ref):
            if p.poll() is None:
                p.kill()
    reference = last_by_step(tmp_path / "ref", "train/loss")
    assert max(last_by_step(run, "train/loss")) < 40
    resumed = run_app(*steps, "resume=auto", f"hydra.run.dir={run}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    assert last_by_step(run, "train/loss") == reference


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(app_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TTTEXP_CACHE_DIR", str(app_cache))
    run = tmp_path / "run"
    first = exit_code_of_the_app([*FAST, "trainer.max_steps=6", "trainer.ckpt_every=2", "trainer.keep_last=3",
                                  f"hydra.run.dir={run}"])
    assert first in (0, None), capsys.readouterr().err[-2000:]
    newest = list_checkpoints(run)[0]
    assert newest.name == "step-00000006.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 3])
    capsys.readouterr()
    again = exit_code_of_the_app([*FAST, "trainer.max_steps=8", "trainer.ckpt_every=2", "trainer.keep_last=2",
                                  "resume=auto", f"hydra.run.dir={run}"])
    out, err = capsys.readouterr()
    assert again in (0, None), err[-2000:]
    damaged = [line for line in err.splitlines() if "step-00000006.pt" in line]
    assert len(damaged) == 1 and "damaged or truncated" in damaged[0] and "step-00000006.pt.damaged" in damaged[0]
    assert "step-00000004.pt (step 4)" in out
    assert (run / "checkpoints" / "step-00000006.pt.damaged").is_file()  # set aside, never counted as kept
    assert [p.name for p in list_checkpoints(run)] == ["step-00000008.pt", "step-00000006.pt"]


class NotData:
    """Anything that is not a tensor or a plain value: loading must refuse to build it."""


def test_loading_refuses_anything_but_data(tmp_path):
    path = tmp_path / "step-00000001.pt"
    torch.save({"step": 1, "model": {}, "extra": NotData()}, path)
    with pytest.raises(CheckpointError, match="more than tensors and plain values") as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path):
    good = save_checkpoint(tmp_path, 1, {"step": 1, "model": {"w": torch.ones(3)}})
    target = tmp_path / "checkpoints" / f".step-00000002.pt.tmp-{os.getpid()}"
    target.symlink_to("/dev/full")  # every write fails with ENOSPC, as on a full disk
    with pytest.raises(CheckpointError, match="No space left on device") as err:
        save_checkpoint(tmp_path, 2, {"step": 2, "model": {"w": torch.zeros(1000)}})
    assert "\n" not in str(err.value)
    assert [p.name for p in list_checkpoints(tmp_path)] == [good.name]
    assert torch.equal(load_checkpoint(good)["model"]["w"], torch.ones(3))
    assert not target.exists()


def test_keep_last_prunes_old_checkpoints(tmp_path):
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, {"step": step, "model": {}}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000005.pt", "step-00000004.pt"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if ".tmp" in p.name]


def test_pruning_sets_damaged_checkpoints_aside_and_keeps_the_newest_that_loads(tmp_path, capsys):
    for step in (5, 6, 7):
        save_checkpoint(tmp_path, step, {"step": step, "model": {"w": torch.full((64,), float(step))}}, keep_last=3)
    damaged = list_checkpoints(tmp_path)[0]
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])  # step 7: truncated
    prune_checkpoints(tmp_path, 7, keep_last=1)  # the damaged one would be the one kept
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000006.pt"]
    assert (tmp_path / "checkpoints" / "step-00000007.pt.damaged").is_file()
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 1 and "step-00000007.pt.damaged" in warnings[0], warnings
    save_checkpoint(tmp_path, 8, {"step": 8, "model": {"w": torch.zeros(64)}}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000008.pt", "step-00000006.pt"]
    assert load_checkpoint(list_checkpoints(tmp_path)[1])["model"]["w"][0] == 6.0


def test_plots_and_eval_of_a_finished_run(run_app, app_cache, tmp_path):
    run = tmp_path / "run"
    out = run_app("experiment=smoke", "logging=none", f"hydra.run.dir={run}")
    assert out.returncode == 0, out.stderr[-2000:]
    for name in ("loss.png", "ppl_by_position.png"):
        with Image.open(run / name) as img:
            img.verify()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    table = [r for r in rows if r.get("key") == "val/ppl_by_position"]
    assert table
    env = {**os.environ, "TTTEXP_CACHE_DIR": str(app_cache)}
    ckpt = list_checkpoints(run)[0]
    result = subprocess.run([sys.executable, "-m", "tttexp.eval", "experiment=smoke", f"checkpoint={ckpt}",
                             f"hydra.run.dir={tmp_path}/eval"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert report["val/loss"] == pytest.approx(summary["summary/final_val_loss"], rel=1e-5)
    assert report["val/ppl_by_position"]
