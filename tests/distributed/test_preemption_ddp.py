"""Preemption of the self-launched DDP recipe (gloo, 2 processes): a signal to the launcher reaches the workers,
they checkpoint, the job exits 3, and resume=auto continues from that checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import last_by_step
from tttexp.training.checkpoint import list_checkpoints, step_of

ARGS = ["experiment=smoke", "logging=none", "strategy=multi_gpu_state_passing", "distributed.nproc_per_node=2",
        "trainer.log_every=1", "trainer.eval_every=0", "trainer.position_eval_sequences=0", "trainer.plots=false",
        "trainer.progress=lines"]


@pytest.mark.slow
def test_sigusr1_to_the_launcher_checkpoints_exits_3_and_resumes(run_app, app_cache, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "TTTEXP_CACHE_DIR": str(app_cache), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tttexp.train", *ARGS, "trainer.max_steps=100000",
                             f"hydra.run.dir={run}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while max(last_by_step(run, "train/loss") if (run / "metrics.jsonl").exists() else {}, default=0) < 3:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.time() < deadline, "the job did not reach step 3"
            time.sleep(0.2)
        proc.send_signal(signal.SIGUSR1)  # what SLURM sends before a preemption; fatal to the launcher before
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, err[-3000:]
    assert "preempted: stopped by signal" in err and "Traceback" not in err, err[-3000:]
    saved = list_checkpoints(run)
    assert len(saved) == 1
    step = step_of(saved[0])
    assert step >= 3

    resumed = run_app(*ARGS, "resume=auto", f"trainer.max_steps={step + 2}", f"hydra.run.dir={run}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {saved[0]} (step {step})" in resumed.stdout
    losses = last_by_step(run, "train/loss")
    assert sorted(losses) == list(range(1, step + 3))
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in Path(run / "metrics.jsonl").read_text()
             .splitlines() if '"train/loss"' in line]
    assert steps == sorted(set(steps))  # the replayed steps are not duplicated
