"""Preemption: SIGTERM, SIGUSR1 and SIGUSR2 sent to the main process each give a checkpoint, exit status 3 and at
most 3 lines of output, on one process and in a self-launched DDP job (2 processes, gloo)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from support import exit_code_of_the_app, last_by_step
from tttexp.training.checkpoint import list_checkpoints, load_checkpoint

FAST = ["experiment=smoke", "logging=none", "trainer.log_every=1", "trainer.eval_every=0", "trainer.progress=none",
        "trainer.position_eval_sequences=0", "trainer.plots=false", "trainer.max_steps=100000"]


def _reached(run: Path, step: int) -> bool:
    return (run / "metrics.jsonl").exists() and max(last_by_step(run, "train/loss"), default=0) >= step


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2])
def test_a_signal_to_one_process_checkpoints_and_exits_3(app_cache, tmp_path, monkeypatch, capsys, sig):
    """In this process: the signal is real, sent by a watcher thread once training is under way."""
    monkeypatch.setenv("TTTEXP_CACHE_DIR", str(app_cache))
    run = tmp_path / "run"
    after: list[str] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set() and not _reached(run, 2):
            time.sleep(0.05)
        if not done.is_set():
            capsys.readouterr()  # what was printed before the signal
            after.append("sent")
            os.kill(os.getpid(), sig)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        code = exit_code_of_the_app([*FAST, f"hydra.run.dir={run}"])
    finally:
        done.set()
        watcher.join()
    out, err = capsys.readouterr()
    assert after == ["sent"] and code == 3, err[-2000:]
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert len(lines) <= 3 and "resume=auto" in lines[-1], lines
    step = load_checkpoint(list_checkpoints(run)[0])["step"]
    assert step >= 2
    if sig == signal.SIGTERM:  # the requeued job continues from the checkpoint
        assert exit_code_of_the_app([*FAST, f"trainer.max_steps={step + 2}", "resume=auto",
                                     f"hydra.run.dir={run}"]) in (0, None)
        assert json.loads((run / "summary.json").read_text())["summary/steps"] == step + 2


def test_signals_and_errors_of_a_launched_ddp_job(app_cache, tmp_path, run_app):
    """Four 2-process jobs side by side. SIGTERM (which torch's launcher took back for its own teardown), SIGUSR2
    (which killed the workers) and SIGUSR1 to the main process: each a checkpoint, status 3 and at most 3 lines;
    resume=auto continues the first. An error inside the workers: its one line (no torch elastic traceback) and
    status 1."""
    env = {**os.environ, "TTTEXP_CACHE_DIR": str(app_cache), "PYTHONUNBUFFERED": "1"}
    (tmp_path / "a.txt").write_text("short text here")
    (tmp_path / "b.txt").write_text("another short one")
    too_little = ["data=text_files", f"data.paths=[{tmp_path}/a.txt,{tmp_path}/b.txt]", "data.vocab_size=300"]
    jobs = {}
    for sig in (signal.SIGTERM, signal.SIGUSR2, signal.SIGUSR1, None):
        run = tmp_path / f"run-{int(sig or 0)}"
        out = open(tmp_path / f"{run.name}.out", "w+")  # noqa: SIM115 - closed below
        argv = [*FAST, "strategy=multi_gpu_state_passing", "distributed.nproc_per_node=2", f"hydra.run.dir={run}",
                *(too_little if sig is None else [])]
        proc = subprocess.Popen([sys.executable, "-m", "tttexp.train", *argv], cwd=tmp_path, env=env, stdout=out,
                                stderr=subprocess.STDOUT, text=True)
        jobs[sig] = (run, out, proc, 0 if sig is None else None)
    try:
        deadline = time.time() + 240
        while any(offset is None for *_, offset in jobs.values()) and time.time() < deadline:
            for sig, (run, out, proc, offset) in jobs.items():
                if offset is None and _reached(run, 1):
                    assert proc.poll() is None, Path(out.name).read_text()[-2000:]
                    offset = os.path.getsize(out.name)  # what the job printed before the signal
                    proc.send_signal(sig)
                    jobs[sig] = (run, out, proc, offset)
            time.sleep(0.1)
        for sig, (run, out, proc, offset) in jobs.items():
            code = proc.wait(timeout=120)
            out.seek(offset or 0)
            lines = [line for line in out.read().splitlines() if line.strip()]
            if sig is None:
                assert code == 1 and [line for line in lines if not line.startswith("warning:")] == \
                    [line for line in lines if line.startswith("error:") and "documents, fewer than" in line], lines
                continue
            assert code == 3 and len(lines) <= 3 and f"signal {int(sig)}" in lines[-1], (sig, code, lines)
            assert load_checkpoint(list_checkpoints(run)[0])["step"] >= 1
    finally:
        for _, out, proc, _ in jobs.values():
            if proc.poll() is None:
                proc.kill()
            out.close()
    run = jobs[signal.SIGTERM][0]
    step = load_checkpoint(list_checkpoints(run)[0])["step"]
    resumed = run_app(*FAST, "strategy=multi_gpu_state_passing", "distributed.nproc_per_node=2", "resume=auto",
                      f"trainer.max_steps={step + 2}", f"hydra.run.dir={run}")
    assert resumed.returncode == 0 and f"(step {step})" in resumed.stdout, resumed.stderr[-2000:]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if '"train/loss"' in line]
    assert steps == list(range(1, step + 3))  # the replayed steps are not duplicated
