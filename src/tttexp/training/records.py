"""What a run reports: the record of each logging window, the counters, the loss history and the summary.

The trainer hands its numbers over; every key comes from :mod:`tttexp.loggers.catalogue`. Kept apart from the loop
so that the loop reads as the steps it takes, and so that a summary can be asked for at any time (a failed run's).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import torch

from tttexp.loggers import catalogue as C
from tttexp.loggers.protocol import Logger
from tttexp.training import metrics as M
from tttexp.training.metrics import Window


class Records:
    """Counters, history and the last validation of a run, and the records and summary built from them."""

    def __init__(self, *, logger: Logger, device: torch.device, world_size: int, is_main: bool,
                 flops_per_token: float, health: Any | None = None) -> None:
        self.logger = logger
        self.device = device
        self.world_size = world_size
        self.is_main = is_main
        self.flops_per_token = flops_per_token
        self.peak = M.peak_flops(device)
        self.health = health
        self.clock = M.RunClock()  # fit() starts its own; this one serves a summary asked for before fit
        self.frames_after_first_step: int | None = None  # torch.compile's frame count after the first step
        self.counters: dict[str, int] = {C.WARN_NONFINITE_STEPS: 0}
        self.history: list[dict[str, float]] = []
        self.last_val: dict[str, float] = {}
        self.final_extras: dict[str, float] = {}
        self.window = Window(device)  # steps since the last record, summed on the device
        self.window_nonfinite = 0
        self.diverged = False  # the weights went non-finite: the run's last loss is not a number
        self._warned: set[str] = set()

    def log(self, record: Mapping[str, Any], step: int) -> None:
        if self.is_main:
            self.logger.log(dict(record), step=step)

    def skipped_step(self) -> None:
        """A step the host-side check found non-finite and skipped."""
        self.counters[C.WARN_NONFINITE_STEPS] += 1

    def train(self, window: Window, lr: float, seconds: float, *, step: int, tokens_seen: int,
              state: Mapping[str, float] | None = None) -> dict[str, float]:
        """The record of one logging window (``state``: the carried-state record under state passing)."""
        loss, grad_norm = window.means()
        self.window_nonfinite = window.nonfinite()
        self.counters[C.WARN_NONFINITE_STEPS] += self.window_nonfinite
        tps = M.tokens_per_second(window.tokens, seconds)
        record: dict[str, float] = {
            C.TRAIN_LOSS: loss,
            C.TRAIN_LEARNING_RATE: lr,
            C.TRAIN_GRAD_NORM: grad_norm,
            C.TRAIN_NONFINITE_STEPS: self.window_nonfinite,  # left out of the two means above
            C.TRAIN_TOKENS_PER_SEC: tps,
            C.TRAIN_TOKENS_SEEN: tokens_seen,
            C.TRAIN_STEP_TIME_MS: 1000.0 * seconds / max(1, window.steps),
            C.SYSTEM_NUM_PROCESSES: self.world_size,
        }
        utilisation = M.mfu(tps, self.flops_per_token, self.peak * self.world_size if self.peak else None)
        if utilisation is not None:
            record[C.SYSTEM_MFU] = utilisation
        record.update(M.memory(self.device))
        if state is not None:
            record.update(state)
        if self.frames_after_first_step is not None:
            self.counters[C.WARN_RECOMPILES] = M.compiled_frames() - self.frames_after_first_step
        record.update(self.counters)
        if self.health is not None:
            for warning in self.health.update(step, record):
                self._warn_once(warning)
            record.update(self.health.counts())
        self.history.append({"step": step, **{k: v for k, v in record.items() if k.startswith(C.TRAIN_PREFIX)}})
        return record

    def validation(self, mean: float, ppl: float) -> dict[str, float]:
        self.last_val = {C.VAL_LOSS: mean, C.VAL_PPL: ppl}
        return dict(self.last_val)

    def _warn_once(self, warning: Any) -> None:
        if warning.kind not in self._warned and self.is_main:
            print(f"warning: {warning.message}", file=sys.stderr, flush=True)
            self.logger.alert(f"tttexp: {warning.kind}", warning.message)
        self._warned.add(warning.kind)

    def counters_now(self) -> dict[str, int]:
        """The counters with the steps not yet logged (one host sync; for checkpoints and the summary)."""
        counters = dict(self.counters)
        counters[C.WARN_NONFINITE_STEPS] += self.window.nonfinite()
        return counters

    def summary(self, *, step: int, tokens_seen: int, data_hash: str | None) -> dict[str, Any]:
        """The run's summary so far: wall time by phase, steady-state tokens/s (compile and evaluation left out;
        ``wall_tokens_per_sec`` spreads everything), the last losses, counters and end-of-run reports."""
        losses = [h[C.TRAIN_LOSS] for h in self.history if C.TRAIN_LOSS in h]  # the last one, finite or not
        summary = {
            **self.clock.summary(),
            C.SUMMARY_FINAL_LOSS: losses[-1] if losses and not self.diverged else float("nan"),
            C.SUMMARY_STEPS: step,
            C.SUMMARY_TOKENS_SEEN: tokens_seen,
            C.SUMMARY_TRAIN_FLOPS: tokens_seen * self.flops_per_token,  # the compute spent, as MFU counts it
        }
        if self.last_val:
            summary[C.SUMMARY_FINAL_VAL_LOSS] = self.last_val[C.VAL_LOSS]
            summary[C.SUMMARY_FINAL_VAL_PPL] = self.last_val[C.VAL_PPL]
        summary.update({k.replace(C.WARNINGS, C.SUMMARY_WARNINGS_PREFIX): v for k, v in self.counters_now().items()})
        summary.update(self.final_extras)
        if data_hash is not None:
            summary[C.SUMMARY_DATA_HASH] = data_hash
        return summary

    def state_dict(self) -> dict[str, Any]:
        return {"counters": self.counters_now(), "history": list(self.history)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.counters.update({k: int(v) for k, v in state.get("counters", {}).items()})
        self.history = list(state.get("history", []))


def state_record(carry: Any, resets: Any, context: Any | None = None) -> dict[str, float]:
    """The carried TTT state under state passing: resets so far and the mean norm of the fast weights. Under
    context parallelism (``context``) each rank holds its heads' states: the mean is taken over the group."""
    norms = [layer.ttt[0].float().norm(dim=(-2, -1)).mean() for layer in carry.layers if layer.ttt]
    record = {C.STATE_RESETS: int(resets)}
    if norms:
        mean = torch.stack(norms).mean()
        if context is not None:  # every rank holds H / cp heads of every layer: equal shares
            mean = context.sum_over_group(mean) / context.size
        record[C.STATE_W_NORM] = float(mean)
    return record


class Progress:
    """A tqdm bar on a terminal, plain lines otherwise (``trainer.progress``: auto | bar | lines | none)."""

    def __init__(self, mode: str, total: int, initial: int, enabled: bool) -> None:
        self.mode = "none" if not enabled else mode
        if self.mode == "auto":
            self.mode = "bar" if sys.stdout.isatty() else "lines"
        self.total = total
        self.bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
        self.last = initial

    def update(self, step: int, record: Mapping[str, float]) -> None:
        text = f"loss {record[C.TRAIN_LOSS]:.4f}  tok/s {record[C.TRAIN_TOKENS_PER_SEC]:,.0f}"
        lr = record[C.TRAIN_LEARNING_RATE]
        line = f"step {step:>6}/{self.total}  {text}  lr {lr:.2e}  grad {record[C.TRAIN_GRAD_NORM]:.3f}"
        if self.bar is not None:
            self.bar.update(step - self.last)
            self.bar.set_postfix_str(text)
            self.bar.write(line)  # above the bar, and so in the run's log too
        elif self.mode == "lines":
            print(line, flush=True)
        self.last = step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
