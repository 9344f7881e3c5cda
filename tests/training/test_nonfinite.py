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
    summary = trainer.summary()
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
    assert summary["summary/total_time"] > 0 and summary["summary/avg_tokens_per_sec"] > 0  # up to the failure
    assert all(_finite(p) for p in ckpt.list_checkpoints(run))


def test_the_window_counts_nonfinite_steps_without_a_host_check():
    from tttexp.training.metrics import Window

    window = Window(torch.device("cpu"))
    for loss, grad in ((2.0, 1.0), (float("nan"), 1.0), (4.0, float("inf")), (3.0, 2.0)):
        window.add(torch.tensor(loss), torch.tensor(grad), True, tokens=8)
    assert window.nonfinite() == 2
    assert window.means() == (2.5, 1.5)


def _fused(trainer) -> None:
    """The optimizer the GPU recipes get (fused AdamW), here on the CPU, with the trainer's own parameter groups."""
    old = trainer.optimizer
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in old.param_groups]
    trainer.optimizer = torch.optim.AdamW(groups, lr=old.defaults["lr"], betas=old.defaults["betas"],
                                          eps=old.defaults["eps"], fused=True)


def _poison(trainer, bad_steps: set[int]) -> None:
    """The loss (and so every gradient) of the given steps becomes NaN."""
    forward = trainer._forward_loss
    trainer._forward_loss = lambda batch: forward(batch) * (math.nan if trainer.step + 1 in bad_steps else 1.0)


def test_the_fast_path_skips_a_nonfinite_step_on_the_device(tmp_path, app_cache, capsys):
    trainer = build_trainer(["strategy=gpu_optimized", "trainer.inference_every=0", "trainer.max_steps=8",
                             "trainer.log_every=4", *QUIET], tmp_path, app_cache)
    assert not trainer.loop.skip_nonfinite
    _fused(trainer)
    _poison(trainer, {3})
    weights: dict[int, list[torch.Tensor]] = {}
    step = trainer._train_step

    def recording_step():
        out = step()
        weights[trainer.step + 1] = [p.detach().clone() for p in trainer.raw_model.parameters()]
        return out

    trainer._train_step = recording_step
    summary = trainer.fit()
    assert all(torch.equal(a, b) for a, b in zip(weights[2], weights[3], strict=True))  # step 3 changed nothing
    assert not all(torch.equal(a, b) for a, b in zip(weights[3], weights[4], strict=True))  # step 4 trained
    assert trainer.optimizer.state[next(iter(trainer.raw_model.parameters()))]["step"] == 7  # 8 steps, 1 skipped
    assert summary["summary/warnings_nonfinite_steps"] == 1 and math.isfinite(summary["summary/final_loss"])
    assert "steps 1-4: 1 non-finite step(s) skipped" in capsys.readouterr().err
    assert [h["train/nonfinite_steps"] for h in trainer.records.history] == [1, 0]  # the record says it
    assert math.isfinite(trainer.records.history[0]["train/loss"])  # the mean of the three finite steps


def test_the_fast_path_stops_when_every_step_of_a_window_is_nonfinite(tmp_path, app_cache):
    trainer = build_trainer(["strategy=gpu_optimized", "trainer.inference_every=0", "trainer.max_steps=12",
                             "trainer.log_every=4", "trainer.max_bad_steps=4", *QUIET], tmp_path, app_cache)
    _fused(trainer)
    _poison(trainer, {5, 6, 7, 8})
    with pytest.raises(TrainingStopped, match="every one of the last 4 steps was non-finite"):
        trainer.fit()
    (saved,) = ckpt.list_checkpoints(tmp_path)
    assert _finite(saved) and ckpt.load_checkpoint(saved)["step"] == 8
