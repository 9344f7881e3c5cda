"""What the fast recipe promises, checked on the CPU: a batch that changes on its way to the step stops the run
(``trainer.check_batches``); a compiled model never recompiles after its first step, through TTT-MLP's inner-LR
warmup included; and the summary splits the wall time by phase and reports the steady-state throughput."""

from __future__ import annotations

import pytest
import torch

from support import build_trainer
from tttexp.errors import TrainingStopped
from tttexp.training import checkpoint as ckpt

QUIET = ["trainer.progress=none", "trainer.plots=false", "trainer.position_eval_sequences=0"]


class _SwapsLabels:
    """A data path that goes wrong after the loader: from batch ``at`` on, labels come from the previous batch."""

    def __init__(self, loader, at: int) -> None:
        self.loader, self.at, self.count, self.previous_labels = loader, at, 0, None

    def __getattr__(self, name: str):
        return getattr(self.loader, name)

    def __next__(self):
        batch = dict(next(self.loader))
        self.count += 1
        labels = batch["labels"]
        if self.count >= self.at:
            batch["labels"] = self.previous_labels
        self.previous_labels = labels
        return batch


def test_a_batch_changed_after_the_loader_stops_the_run_before_anything_is_saved(tmp_path, app_cache):
    trainer = build_trainer(["trainer.check_batches=true", "trainer.max_steps=6", "trainer.log_every=2", *QUIET],
                            tmp_path, app_cache)
    trainer.data._train_loader = _SwapsLabels(trainer.data.train_loader, at=3)
    with pytest.raises(TrainingStopped, match=r"batch of step 3 changed .*data\.prefetch=false") as stopped:
        trainer.fit()
    assert "\n" not in str(stopped.value)
    assert trainer.step == 4 and not ckpt.list_checkpoints(tmp_path)


def test_compiled_ttt_mlp_never_recompiles_through_the_inner_lr_warmup(tmp_path, app_cache):
    trainer = build_trainer(["model.ttt_layer=mlp", "optim.warmup_steps=5", "trainer.max_steps=7",
                             "trainer.log_every=7", "trainer.eval_every=0", "trainer.check_batches=true", *QUIET],
                            tmp_path, app_cache)
    torch._dynamo.reset()
    trainer.model = torch.compile(trainer.raw_model, backend="eager")  # dynamo's guards, without code generation
    summary = trainer.fit()
    scales = {float(layer.inner_lr_scale) for layer in trainer.raw_model.ttt_layers()}
    assert scales == {1.0}  # the ramp ran: 0.28, 0.46, ... 1.0
    assert trainer.records.frames_after_first_step > 0  # it did compile
    assert trainer.records.counters["warnings/recompiles"] == 0
    assert summary["summary/warnings_recompiles"] == 0
    phases = sum(summary[f"summary/{p}_time"] for p in ("compile", "train", "eval", "other"))
    assert phases == pytest.approx(summary["summary/total_time"], rel=1e-6)
    assert summary["summary/compile_time"] > 0 and summary["summary/avg_tokens_per_sec"] > 0
