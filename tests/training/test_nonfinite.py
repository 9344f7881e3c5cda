"""A run that goes non-finite saves nothing non-finite, keeps its good checkpoints, reports the truth and fails;
in the fast recipes too, where steps are not checked one by one (no host sync per step)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from support import build_trainer, exit_code_of_the_app
from tttexp.errors import TrainingStopped
from tttexp.training import checkpoint as ckpt

QUIET = ["trainer.eval_every=0", "trainer.position_eval_sequences=0", "trainer.plots=false", "trainer.progress=none"]
DIVERGES = ["optim.lr=1e6", "trainer.max_steps=12", "trainer.log_every=4", "trainer.ckpt_every=1",
            "trainer.keep_last=1"]


def _finite(path) -> bool:
    state = ckpt.load_checkpoint(path)
    tensors = list(state["model"].values())
    tensors += [v for s in state["optimizer"]["state"].values() for v in s.values() if torch.is_tensor(v)]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


@pytest.mark.parametrize("recipe", [["strategy=gpu_optimized", "trainer.inference_every=0"],
                                    ["strategy=multi_gpu_state_passing", "distributed.nproc_per_node=1"]])
def test_divergence_saves_nothing_nonfinite_and_keeps_the_good_checkpoint(tmp_path, app_cache, recipe):
    trainer = build_trainer([*recipe, *QUIET, *DIVERGES], tmp_path, app_cache)
    assert not trainer.loop.skip_nonfinite  # the fast path: no per-step check
    with pytest.raises(TrainingStopped, match="weights are not finite.*nothing was saved.*last good checkpoint"):
        trainer.fit()
    saved = ckpt.list_checkpoints(tmp_path)
    assert saved and all(_finite(p) for p in saved)  # the good one survived pruning (keep_last=1)
    summary = trainer._summary(1.0)
    assert summary["summary/warnings_nonfinite_steps"] >= 1
    assert math.isnan(summary["summary/final_loss"])
    assert summary["summary/steps"] < 12


def test_the_app_exits_nonzero_and_its_summary_tells_the_truth(tmp_path, monkeypatch, capsys, app_cache):
    run = tmp_path / "run"
    monkeypatch.setenv("TTTEXP_CACHE_DIR", str(app_cache))
    code = exit_code_of_the_app(["experiment=smoke", "logging=none", "strategy=gpu_optimized", "optim.lr=1e6",
                                 "trainer.max_steps=40", "trainer.ckpt_every=10", "trainer.inference_every=0",
                                 *QUIET, f"hydra.run.dir={run}"])
    assert code == 1
    assert "weights are not finite" in capsys.readouterr().err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["summary/warnings_nonfinite_steps"] >= 1
    assert math.isnan(summary["summary/final_loss"])
    assert all(_finite(p) for p in ckpt.list_checkpoints(run))


def test_the_window_counts_nonfinite_steps_without_a_host_check():
    from tttexp.training.metrics import Window

    window = Window(torch.device("cpu"))
    for loss, grad in ((2.0, 1.0), (float("nan"), 1.0), (4.0, float("inf")), (3.0, 2.0)):
        window.add(torch.tensor(loss), torch.tensor(grad), True, tokens=8)
    assert window.nonfinite() == 2
    assert window.means() == (2.5, 1.5)
