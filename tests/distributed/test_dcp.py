"""Sharded (DCP) checkpoints: a save killed with SIGKILL is skipped and the previous one continues the run; a
checkpoint directory can run no code; a different model shape is one line naming both shapes."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

from tttexp.errors import CheckpointError
from tttexp.training import dcp
from tttexp.training.checkpoint import latest_valid_checkpoint, load_checkpoint

from . import fsdp_worker as W

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIX = ["distributed.checkpoint=dcp", "trainer.max_steps=6", "trainer.ckpt_every=2"]

KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import torch
    from torch.distributed.checkpoint import FileSystemWriter
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from distributed import fsdp_worker as W

    finish, saves = FileSystemWriter.finish, []
    def finish_or_die(self, *args, **kwargs):  # the second save dies after its shards, before its metadata
        saves.append(1)
        if len(saves) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return finish(self, *args, **kwargs)
    FileSystemWriter.finish = finish_or_die
    W.train(W.overrides("linear", 1, "single", *{six!r}), Path({run!r}), Path({cache!r}))
""")


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_sigkill_during_a_save_resumes_from_the_previous_complete_checkpoint(tmp_path, app_cache, capfd,
                                                                             one_thread):
    run = tmp_path / "run"
    script = KILLED_SAVE.format(tests=TESTS, six=SIX, run=str(run), cache=str(app_cache))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TTTEXP_CACHE_DIR": str(app_cache)})
    assert proc.returncode == -9, proc.stderr[-2000:]
    half = run / "checkpoints/step-00000004.dcp"
    assert half.is_dir() and any(half.glob("*.distcp")) and not (half / dcp.MARKER).exists()

    capfd.readouterr()
    path, state = latest_valid_checkpoint(run)
    warning = capfd.readouterr().err.strip().splitlines()
    assert path.name == "step-00000002.dcp" and state["step"] == 2
    assert len(warning) == 1 and "step-00000004.dcp is not complete" in warning[0]

    _, resumed = W.train(W.overrides("linear", 1, "single", *SIX), run, app_cache, resume=path)
    _, whole = W.train(W.overrides("linear", 1, "single", *SIX), tmp_path / "whole", app_cache)
    assert all(abs(resumed[s] - whole[s]) <= 1e-6 * abs(whole[s]) for s in range(3, 7))
    assert (run / "checkpoints/step-00000006.dcp" / dcp.MARKER).exists()
    # a save cut off after its metadata but before the marker is passed over as well
    (run / "checkpoints/step-00000006.dcp" / dcp.MARKER).unlink()
    assert latest_valid_checkpoint(run)[0].name == "step-00000004.dcp"


class _Payload:
    """Unpickling this runs ``open(path, 'w')``: the test fails if any loader lets it run."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_nothing_in_a_checkpoint_directory_runs(tmp_path, app_cache, one_thread):
    trainer, _ = W.train(W.overrides("linear", 1, "single", "distributed.checkpoint=dcp", "trainer.max_steps=1"),
                         tmp_path / "run", app_cache)
    path = tmp_path / "run/checkpoints/step-00000001.dcp"
    marker = tmp_path / "ran"
    # DCP reads .metadata with pickle.load: a crafted one is refused before any of it is built
    good = (path / ".metadata").read_bytes()
    (path / ".metadata").write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(CheckpointError, match="refused metadata"):
        dcp.load_into(path, trainer.raw_model, trainer.optimizer)
    assert not marker.exists()
    (path / ".metadata").write_bytes(good)

    # DCP reads non-tensor entries with torch.load(weights_only=False): such entries are refused
    import torch.distributed.checkpoint as tdcp

    evil = tmp_path / "evil.dcp"
    with dcp._one_process_is_fine():
        tdcp.save({"model.lm_head.weight": _Payload(str(marker))}, checkpoint_id=evil, no_dist=True)
    with pytest.raises(tdcp.api.CheckpointException, match="is not a tensor"), dcp._one_process_is_fine():
        tdcp.load({"model.lm_head.weight": torch.zeros(3)}, storage_reader=dcp._safe_reader(evil),
                  planner=dcp._safe_planner(), no_dist=True)
    assert not marker.exists()


def test_a_different_model_shape_is_one_line_naming_both(tmp_path, app_cache, one_thread):
    W.train(W.overrides("linear", 1, "single", "distributed.checkpoint=dcp", "trainer.max_steps=1"),
            tmp_path / "run", app_cache)
    other, _ = W.train(W.overrides("linear", 1, "single", "trainer.max_steps=1", "model.hidden_size=32"),
                       tmp_path / "other", app_cache)
    with pytest.raises(CheckpointError) as err:
        other.restore(load_checkpoint(tmp_path / "run/checkpoints/step-00000001.dcp"))
    text = str(err.value)
    assert "\n" not in text and "hidden=64" in text and "hidden=32" in text
    assert "is [4096, 64] there and [4096, 32] here" in text
