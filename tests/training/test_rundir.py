"""Run directories have one owner: the lock, stale locks and temporaries, the fresh-run and fingerprint rules,
pruning, replayed metrics, the wandb run a resume continues, and one-line checkpoint errors."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest
import torch

from support import exit_code_of_the_app
from tttexp.app.preflight import compose_config
from tttexp.app.schemas import fingerprint
from tttexp.errors import CheckpointError, ConfigError
from tttexp.loggers import JsonlLogger, Resume, find_run_files, read_metrics, read_run
from tttexp.training import checkpoint as ckpt
from tttexp.training import rundir

FAST = ["experiment=smoke", "trainer.eval_every=0", "trainer.position_eval_sequences=0", "trainer.plots=false",
        "trainer.progress=none"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _state(step: int, fingerprint: dict | None = None) -> dict:
    return {"step": step, "model": {"w": torch.ones(3)}, "fingerprint": fingerprint}


# -- the lock ----------------------------------------------------------------------------------------------------


def test_a_second_live_run_stops_naming_the_holder(tmp_path):
    with rundir.RunLock(tmp_path), pytest.raises(ConfigError, match=rf"in use by another run \(PID {os.getpid()} "):
        rundir.RunLock(tmp_path).acquire()
    rundir.RunLock(tmp_path).acquire().release()  # free again once released


def test_the_app_refuses_a_directory_another_run_holds(tmp_path, capsys):
    run = tmp_path / "run"
    with rundir.RunLock(run):
        code = exit_code_of_the_app([*FAST, "logging=none", f"hydra.run.dir={run}"])  # stopped at the lock
    assert code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"PID {os.getpid()}" in errors[0], errors
    assert [p.name for p in run.iterdir()] == [rundir.LOCK_FILE]  # refused before Hydra wrote .hydra/ or a log


def test_a_stale_lock_and_dead_writers_temporaries_are_taken_over(tmp_path, capsys):
    dead = _dead_pid()
    (tmp_path / rundir.LOCK_FILE).write_text(f"{dead} on somewhere\n")  # left by a killed run: no flock held
    folder = ckpt.checkpoint_dir(tmp_path)
    folder.mkdir()
    stale = folder / f".step-00000004.pt.tmp-{dead}"
    live = folder / f".step-00000004.pt.tmp-{os.getpid()}"
    stale.write_bytes(b"half")
    live.write_bytes(b"writing")
    lock = rundir.RunLock(tmp_path).acquire()
    try:
        assert f"held by {dead} on somewhere" in capsys.readouterr().err
        assert not stale.exists() and live.exists()
        assert (tmp_path / rundir.LOCK_FILE).read_text().startswith(f"{os.getpid()} on ")
    finally:
        lock.release()


# -- ownership and the fingerprint ---------------------------------------------------------------------------------


def test_a_fresh_run_never_adopts_another_runs_checkpoints(tmp_path):
    ckpt.save_checkpoint(tmp_path, 30, _state(30))
    with pytest.raises(CheckpointError, match="holds another run's checkpoints.*resume=auto.*new hydra.run.dir"):
        rundir.resume_state(None, tmp_path, {})
    elsewhere = tmp_path / "other" / "step-00000010.pt"
    ckpt.save_checkpoint(tmp_path / "other", 10, _state(10))
    with pytest.raises(CheckpointError, match="directory of its own"):
        rundir.resume_state(str(elsewhere.parent / "checkpoints" / elsewhere.name), tmp_path, {})


def test_resume_refuses_other_math_and_allows_other_lengths(tmp_path):
    base = ["experiment=smoke", "logging=none"]
    mine = fingerprint(compose_config([*base, "seed=0"]))
    ckpt.save_checkpoint(tmp_path, 6, _state(6, mine))
    longer = fingerprint(compose_config([*base, "seed=0", "trainer.max_steps=50", "trainer.log_every=1"]))
    assert rundir.resume_state("auto", tmp_path, longer)["step"] == 6
    other = fingerprint(compose_config([*base, "seed=1", "model.hidden_size=128"]))
    with pytest.raises(CheckpointError) as refused:
        rundir.resume_state("auto", tmp_path, other)
    message = str(refused.value)
    assert "\n" not in message
    for key in ("seed 0 -> 1", "data.seed 0 -> 1", "model.hidden_size 64 -> 128"):
        assert key in message, message
    with pytest.raises(CheckpointError, match="seed 0 -> 1"):  # resume=path checks it too
        rundir.resume_state(str(ckpt.checkpoint_path(tmp_path, 6)), tmp_path, other)


# The fingerprint of `experiment=smoke` on one process as checkpoints already on disk hold it (written when the keys
# were a hand-kept list): the fields marked RESUME must give the same keys and values, or those runs cannot resume.
SAVED_SMOKE = {
    "seed": 0, "global_batch": 4,
    "model._target_": "tttexp.models.FromScratch", "model.hidden_size": 64, "model.num_hidden_layers": 2,
    "model.num_attention_heads": 2, "model.intermediate_size": 176, "model.mixer": "ttt", "model.mixer_types": None,
    "model.num_key_value_heads": None, "model.ttt_layer": "linear", "model.backbone": "mamba",
    "model.mini_batch_size": 16, "model.ttt_base_lr": None, "model.rope_theta": 10000.0, "model.conv_kernel": 4,
    "model.vocab_size": None, "model.base_model": None, "model.convert_layers": "all", "model.freeze": False,
    "data.source": "shipped", "data.paths": None, "data.hf_dataset": None, "data.hf_config": None,
    "data.hf_split": "train", "data.text_field": "text", "data.max_documents": None, "data.max_tokens": None,
    "data.tokenizer": "bpe", "data.vocab_size": 4096, "data.seq_len": 64, "data.stream": False,
    "data.val_fraction": 0.05, "data.seed": 0,
    "optim.lr": 0.0015, "optim.betas": [0.9, 0.95], "optim.weight_decay": 0.1, "optim.eps": 1e-08,
    "optim.warmup_steps": 20, "optim.min_lr_ratio": 0.1, "optim.max_grad_norm": 0.5,
    "trainer.precision": "fp32", "trainer.reset_on_document": True,
}


def test_the_marked_fields_give_the_fingerprint_existing_checkpoints_hold(tmp_path):
    current = fingerprint(compose_config(["experiment=smoke", "logging=none"]))
    assert {key: current.get(key, "absent") for key in SAVED_SMOKE} == SAVED_SMOKE
    ckpt.save_checkpoint(tmp_path, 6, _state(6, SAVED_SMOKE))
    assert rundir.resume_state("auto", tmp_path, current)["step"] == 6  # a key marked since (data.shuffle) is no bar


def test_a_resume_on_fewer_processes_names_the_setting_that_keeps_the_global_batch(tmp_path):
    config = compose_config(["experiment=smoke", "logging=none"])  # data.batch_size=4
    ckpt.save_checkpoint(tmp_path, 6, _state(6, fingerprint(config, world_size=2)))
    with pytest.raises(CheckpointError, match=r"global_batch 8 -> 4.*set trainer\.grad_accum_steps=2 to keep"):
        rundir.resume_state("auto", tmp_path, fingerprint(config, world_size=1), rows=4)
    with pytest.raises(CheckpointError, match=r"data\.batch_size x trainer\.grad_accum_steps x processes = 8"):
        rundir.resume_state("auto", tmp_path, fingerprint(config, world_size=3), rows=12)


def test_resume_auto_stops_when_every_checkpoint_is_damaged(tmp_path):
    for step in (2, 4):
        ckpt.checkpoint_path(tmp_path, step).parent.mkdir(parents=True, exist_ok=True)
        ckpt.checkpoint_path(tmp_path, step).write_bytes(os.urandom(300))
    with pytest.raises(CheckpointError, match="none loads; to start over"):
        rundir.resume_state("auto", tmp_path, {})
    assert rundir.resume_state("auto", tmp_path / "empty", {}) is None  # nothing there: a fresh start


def test_pruning_keeps_newer_checkpoints_it_did_not_write(tmp_path):
    ckpt.save_checkpoint(tmp_path, 20, _state(20))  # another branch, further on
    for step in (5, 6, 7):
        ckpt.save_checkpoint(tmp_path, step, _state(step), keep_last=2)
    assert [ckpt.step_of(p) for p in ckpt.list_checkpoints(tmp_path)] == [20, 7, 6]


def test_replayed_steps_are_not_duplicated_in_metrics(tmp_path):
    first = JsonlLogger()
    first.start(tmp_path, {}, {})
    for step in range(1, 9):
        first.log({"train/loss": float(step)}, step=step)
    first._file.write('{"step": 9, "train/lo')  # killed mid-line
    first._file.close()
    first._file = None
    second = JsonlLogger()
    second.start(tmp_path, {}, {}, resume=Resume(step=6))
    for step in (7, 8, 9):
        second.log({"train/loss": float(step)}, step=step)
    second.finish({})
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert steps == list(range(1, 10))


# -- checkpoint errors in one line ------------------------------------------------------------------------------


def test_checkpoint_errors_say_what_the_file_is(tmp_path):
    good = ckpt.save_checkpoint(tmp_path, 1, {"step": 1, "model": {"w": torch.ones(20000)}})
    noise = tmp_path / "noise.pt"
    noise.write_bytes(os.urandom(4000))
    with pytest.raises(CheckpointError, match=r"is not a checkpoint \(not a torch.save archive\)$"):
        ckpt.load_checkpoint(noise)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:30000])
    with pytest.raises(CheckpointError) as damaged:
        ckpt.load_checkpoint(cut)
    assert str(damaged.value).endswith("resume from an earlier one") and "truncated" in str(damaged.value)


def test_a_full_disk_during_a_checkpoint_says_so(tmp_path, monkeypatch):
    """ENOSPC injected at the write call (torch itself would only report ``enforce fail``)."""
    real_open = open

    class Full:
        def __init__(self, handle):
            self.handle, self.written = handle, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 4096:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.handle.write(data)

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    monkeypatch.setattr(ckpt, "open", lambda path, mode="r", *a, **k: Full(real_open(path, mode, *a, **k))
                        if "w" in mode else real_open(path, mode, *a, **k), raising=False)
    with pytest.raises(CheckpointError, match="the disk is full") as full:
        ckpt.save_checkpoint(tmp_path, 3, {"step": 3, "model": {"w": torch.ones(100000)}})
    assert "enforce fail" not in str(full.value)
    assert os.listdir(ckpt.checkpoint_dir(tmp_path)) == []  # no temporary left


def test_a_full_disk_during_metrics_says_metrics_stopped(tmp_path, caplog):
    logger = JsonlLogger()
    logger.start(tmp_path, {}, {})
    logger.log({"train/loss": 1.0}, step=1)

    def full(_text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    logger._file.write = full  # the disk fills up
    logger.log({"train/loss": 0.5}, step=2)
    logger.log({"train/loss": 0.4}, step=3)
    logger.finish({"summary/final_loss": 0.4})
    notices = [r.getMessage() for r in caplog.records if "metrics stopped" in r.getMessage()]
    assert len(notices) == 1 and "the disk is full" in notices[0] and "step 2" in notices[0]
    assert json.loads((tmp_path / "summary.json").read_text())["summary/final_loss"] == 0.4


def test_resuming_another_model_shape_names_the_shapes():
    from tttexp.models import TTTConfig, TTTForCausalLM

    def model(hidden: int) -> TTTForCausalLM:
        return TTTForCausalLM(TTTConfig(vocab_size=64, hidden_size=hidden, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2))

    with pytest.raises(RuntimeError) as failed:
        model(48).load_state_dict(model(32).state_dict())
    message = ckpt.shape_mismatches(failed.value)
    assert "\n" not in message and len(message) < 300
    assert "shape(s) differ" in message and "[64, 32] vs [64, 48]" in message, message


# -- the wandb run a resume continues ------------------------------------------------------------------------------


def test_a_resume_continues_the_checkpoints_wandb_run(tmp_path, app_cache, monkeypatch):
    from tttexp.app.train import run

    monkeypatch.setenv("TTTEXP_CACHE_DIR", str(app_cache))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    wandb = ["logging=wandb", "logging.mode=offline", "logging.run_name=first"]
    run(compose_config([*FAST, *wandb, "trainer.max_steps=4"]), tmp_path / "a")
    first = read_run(find_run_files(tmp_path / "a")[0])
    saved = ckpt.list_checkpoints(tmp_path / "a")[0]
    assert torch.load(saved, weights_only=True)["wandb_run_id"] == first.run_id

    run(compose_config([*FAST, *wandb, "trainer.max_steps=6", f"resume={saved}"]), tmp_path / "b")
    second = read_run(find_run_files(tmp_path / "b")[0])
    assert second.run_id == first.run_id
    assert sorted({int(row["train/step"]) for row in second.history if "train/loss" in row}) == [6]
