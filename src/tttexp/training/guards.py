"""What stops a run on purpose: non-finite steps and weights, and a batch that changed before its step used it.

The trainer asks these at its checkpoints in the loop; they count, warn and build the one-line error, and the
trainer decides when to save before raising it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from tttexp.data import integrity
from tttexp.errors import TrainingStopped
from tttexp.loggers import catalogue as C
from tttexp.training.config import TrainerConfig
from tttexp.training.records import Records


class NonfiniteGuard:
    """Non-finite steps are skipped and counted; too many stop the run; non-finite weights are never saved."""

    def __init__(self, loop: TrainerConfig, records: Records, is_main: bool) -> None:
        self.loop = loop
        self.records = records
        self.is_main = is_main
        self.bad_steps_in_a_row = 0

    def skipped(self, step: int) -> bool:
        """Step ``step`` was skipped on the host; True when the run must stop (save, then raise
        :meth:`too_many_in_a_row`)."""
        self.bad_steps_in_a_row += 1
        self.records.skipped_step()
        if self.is_main:
            print(f"warning: step {step}: non-finite loss or gradients; step skipped "
                  f"({self.bad_steps_in_a_row} in a row)", file=sys.stderr, flush=True)
        return self.bad_steps_in_a_row >= self.loop.max_bad_steps

    def too_many_in_a_row(self, path: Path | None) -> TrainingStopped:
        return TrainingStopped(
            f"{self.bad_steps_in_a_row} non-finite steps in a row (trainer.max_bad_steps="
            f"{self.loop.max_bad_steps}); the last good weights are in {path}. Lower optim.lr or check the data"
        )

    def window_all_bad(self, step: int, window_steps: int) -> bool:
        """Steps skipped on the device since the last record: warn; True when every one of at least
        ``trainer.max_bad_steps`` was bad (save, then raise :meth:`every_step_bad`)."""
        bad = self.records.window_nonfinite
        if self.is_main:
            print(f"warning: steps {step - window_steps + 1}-{step}: {bad} non-finite "
                  "step(s) skipped", file=sys.stderr, flush=True)
        return bad >= window_steps >= self.loop.max_bad_steps

    def every_step_bad(self, window_steps: int, path: Path | None) -> TrainingStopped:
        return TrainingStopped(
            f"every one of the last {window_steps} steps was non-finite (trainer.max_bad_steps="
            f"{self.loop.max_bad_steps}); the last good weights are in {path}. Lower optim.lr or check the data"
        )

    def diverged(self, step: int, last: Path | None) -> TrainingStopped:
        """The weights are not finite: nothing is saved, and the run's last loss is not a number."""
        self.records.diverged = True
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was written"
        return TrainingStopped(
            f"the weights are not finite at step {step} "
            f"({self.records.counters_now()[C.WARN_NONFINITE_STEPS]} non-finite steps); nothing was saved and "
            f"{where}. Lower optim.lr, or set trainer.skip_nonfinite=true to skip bad steps"
        )


class BatchCheck:
    """``trainer.check_batches``: the first step whose batch changed between the loader and its use, kept on the
    device (0: none yet) and read at each record."""

    def __init__(self, device: torch.device) -> None:
        self.changed_at = torch.zeros((), dtype=torch.long, device=device)

    def after_step_read(self, batch: dict[str, torch.Tensor], step: int) -> None:
        """After the step has read the batch: a change at any time shows."""
        self.changed_at = torch.where((self.changed_at == 0) & integrity.changed(batch), step, self.changed_at)

    def check(self, layout: Any) -> None:
        """Stop if a batch changed (one host sync)."""
        step = int(layout.all_reduce_max(self.changed_at.float()))
        if step:
            raise TrainingStopped(
                f"the training batch of step {step} changed between the loader and the step that read it "
                "(trainer.check_batches); the weights were not saved. Run with data.prefetch=false and report it"
            )
