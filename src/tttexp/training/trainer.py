"""The training loop: micro-batches, accumulation, clipping, LR schedule, and when to evaluate and save.

Read top to bottom: :meth:`Trainer.fit` is the loop; everything it calls is below it in the order it is used.
The trainer talks to a :class:`tttexp.loggers.Logger` (never to wandb) and to a
:class:`tttexp.distributed.ProcessLayout` (never to torch.distributed directly). What a checkpoint holds and how it
is written is :class:`tttexp.training.checkpoint_manager.CheckpointManager`'s; the records and the summary are
:class:`tttexp.training.records.Records`'.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tttexp.distributed import ProcessLayout
from tttexp.loggers import catalogue as C
from tttexp.loggers.protocol import Logger
from tttexp.models import TTTCache, TTTForCausalLM
from tttexp.training import metrics as M
from tttexp.training.checkpoint_manager import CheckpointManager
from tttexp.training.config import TrainerConfig
from tttexp.training.fairness import TokenHash
from tttexp.training.guards import BatchCheck, NonfiniteGuard
from tttexp.training.inference import inference_report
from tttexp.training.long_context import final_reports
from tttexp.training.metrics import Window
from tttexp.training.optimizer import OptimConfig, build_optimizer
from tttexp.training.preemption import Preempted, PreemptionFlag, requeue_slurm_job
from tttexp.training.records import Progress, Records, state_record
from tttexp.training.schedule import lr_at
from tttexp.training.validation import mean_loss_all


class Trainer:
    """Steps a model on a data module's loader under a process layout, to ``trainer.max_steps``."""

    def __init__(
        self,
        *,
        model: TTTForCausalLM,
        data: Any,
        layout: ProcessLayout,
        logger: Logger,
        optim: OptimConfig,
        loop: TrainerConfig,
        run_dir: Path,
        health: Any | None = None,
        resume_state: dict[str, Any] | None = None,
        fingerprint: dict[str, Any] | None = None,
        passkey: Any | None = None,
    ) -> None:
        self.raw_model, self.data, self.layout, self.logger = model, data, layout, logger
        self.optim, self.loop = optim, loop
        self.run_dir = Path(run_dir)
        self.passkey = passkey  # PasskeyConfig: passkey retrieval at the end (training/passkey.py)
        self.token_hash = TokenHash()  # the training tokens consumed, in order (the study's fairness record)
        self.device = layout.device
        self.model = layout.prepare_model(model)
        self.optimizer = build_optimizer(self.raw_model, optim, self.device)
        # sharded (DTensor) parameters keep the log-step check only; plain ones may skip a bad step on the device
        self._plain_params = not any(hasattr(p, "to_local") for p in self.raw_model.parameters())
        self.checkpoints = CheckpointManager(run_dir=self.run_dir, layout=layout, model=model,
                                             optimizer=self.optimizer, loader=data.train_loader,
                                             keep_last=loop.keep_last, fingerprint=fingerprint)
        self.stream = bool(getattr(data, "stream", False))  # per-row streams: carry each row's TTT state
        self.batch_check = BatchCheck(self.device) if loop.check_batches else None
        self.preemption = PreemptionFlag()
        self.step = 0
        self.tokens_seen = 0
        self.carry: TTTCache | None = None
        self.resets = 0
        self.records = Records(logger=logger, device=self.device, world_size=layout.world_size,
                               is_main=layout.is_main, flops_per_token=M.model_flops_per_token(model, data.seq_len),
                               health=health)
        self.guard = NonfiniteGuard(loop, self.records, layout.is_main)
        if resume_state is not None:
            self.restore(resume_state)

    # --- The loop ---

    def fit(self) -> dict[str, Any]:
        """Train to ``max_steps``; returns the run summary (also written to summary.json by the logger)."""
        records = self.records
        records.clock = M.RunClock()
        progress = Progress(self.loop.progress, self.loop.max_steps, self.step, enabled=self.layout.is_main)
        watch = M.Stopwatch(self.device)
        records.window = Window(self.device)
        tokens_per_step = self.data.train_loader.tokens_per_batch * self.loop.grad_accum_steps
        tokens_per_step *= self.layout.data_world_size
        first_step = self.step + 1  # of this process: it compiles, so it is timed on its own
        first_seconds = 0.0
        self.checkpoints.save_tokenizer(getattr(self.data, "tokenizer", None))
        self.preemption.install()
        self.model.train()
        try:
            while self.step < self.loop.max_steps:
                lr = self._set_learning_rate(self.step)
                loss, grad_norm, ok = self._train_step()
                self.step += 1
                self.tokens_seen += tokens_per_step
                records.clock.tokens += tokens_per_step
                records.window.add(loss, grad_norm, ok, tokens_per_step)
                if self.step == first_step:
                    first_seconds = watch.lap()
                    records.clock.add("compile", first_seconds)
                    records.frames_after_first_step = M.compiled_frames()

                if self.step % self.loop.log_every == 0 or self.step == self.loop.max_steps:
                    seconds = watch.lap()
                    records.clock.window(records.window.tokens - (tokens_per_step if first_seconds else 0), seconds)
                    state = (state_record(self.carry, self.resets, self.layout.context)
                             if self.stream and self.carry is not None else None)
                    record = records.train(records.window, lr, seconds + first_seconds, step=self.step,
                                           tokens_seen=self.tokens_seen, state=state)
                    first_seconds = 0.0
                    self._log(record)
                    progress.update(self.step, record)
                    window_steps, records.window = records.window.steps, Window(self.device)
                    self._check_batches()
                    if records.window_nonfinite:
                        self._after_nonfinite_window(window_steps)
                if self._every(self.loop.eval_every):
                    self._timed("eval", lambda: self._log(self.evaluate()), watch)
                if self._every(self.loop.inference_every):
                    self._timed("eval", self._time_inference, watch)
                if self._every(self.loop.ckpt_every):
                    self.save()
                    watch.restart()
                if self.preemption.requested_anywhere(self.layout):
                    path = self.save()
                    requeued = self.preemption.hand_over() or requeue_slurm_job()
                    raise Preempted(
                        f"stopped by signal {self.preemption.signal} after step {self.step}; checkpoint {path}; "
                        + ("the job was requeued" if requeued else "run again with resume=auto to continue")
                    )
        finally:
            self.preemption.uninstall()
            progress.close()
            if hasattr(self.data.train_loader, "close"):
                self.data.train_loader.close()

        self._check_batches()
        if self.loop.eval_every:
            self._timed("eval", lambda: self._log(self.evaluate()))
        self.save()
        self._timed("eval", self._final_reports)
        return self.summary()

    def _timed(self, phase: str, action: Any, watch: M.Stopwatch | None = None) -> None:
        """Run ``action`` and book its wall time to ``phase``; the step stopwatch leaves it out."""
        start = time.perf_counter()
        action()
        if watch is not None:
            watch.restart()
        self.records.clock.add(phase, time.perf_counter() - start)

    def _check_batches(self) -> None:
        if self.batch_check is not None:  # trainer.check_batches
            self.batch_check.check(self.layout)

    def _every(self, period: int) -> bool:
        """A periodic action due at this step (the final step has its own end-of-run actions)."""
        return bool(period) and self.step % period == 0 and self.step < self.loop.max_steps

    # --- One optimizer step ---

    def _train_step(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Accumulate ``grad_accum_steps`` micro-batches, clip, check, update.

        Returns the loss and gradient norm as device tensors (no host sync unless non-finite steps are
        checked) and whether the update was applied.
        """
        accum = self.loop.grad_accum_steps
        total = torch.zeros((), device=self.device)
        for micro in range(accum):
            raw = next(self.data.train_loader)
            self.token_hash.update(raw["input_ids"])
            whole = {k: v.to(self.device, non_blocking=True) for k, v in raw.items()}
            batch = self.layout.local_batch(whole)  # this rank's slice of each sequence under context parallel
            if self.stream and self.loop.reset_on_document and "doc_start" in whole:
                self.resets = self.resets + whole["doc_start"].sum()  # the whole sequences' document starts
            with self.layout.no_sync(self.model, last_micro_batch=micro == accum - 1), self.layout.autocast():
                loss = self._forward_loss(batch)
            (loss / accum).backward()
            total += loss.detach()
            if self.batch_check is not None:  # the batch as the loader made it (its fingerprint is of all of it)
                self.batch_check.after_step_read(whole, self.step + 1)
        loss = self.layout.all_reduce_mean(total / accum)
        params = [p for p in self.raw_model.parameters() if p.grad is not None]
        grad_norm = self.layout.grad_norm(params, self.optim.max_grad_norm)  # clips when max_grad_norm > 0
        if self.loop.skip_nonfinite:
            if not bool(torch.isfinite(loss) & torch.isfinite(grad_norm)):
                self.optimizer.zero_grad(set_to_none=True)  # weights and optimizer untouched
                if self.guard.skipped(self.step + 1):
                    self.step += 1
                    raise self.guard.too_many_in_a_row(self.save())
                return loss, grad_norm, False
            self.guard.bad_steps_in_a_row = 0
        elif self._skips_on_device():
            # The fused AdamW leaves weights, moments and its step count as they were when found_inf is 1 (as under
            # a GradScaler): a non-finite step is skipped without a host sync; the Window counts it.
            self.optimizer.found_inf = (~(torch.isfinite(loss) & torch.isfinite(grad_norm))).float()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm.detach(), True

    def _forward_loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if not self.stream:
            return self.model(batch["input_ids"], labels=batch["labels"], use_cache=False).loss
        cache = self.carry if self.carry is not None else TTTCache(self.raw_model.config.num_hidden_layers)
        starts = batch.get("doc_start") if self.loop.reset_on_document else None
        out = self.model(batch["input_ids"], labels=batch["labels"], cache=cache, use_cache=True, doc_starts=starts)
        self.carry = out.cache.detach()  # under context parallel: this rank's heads, its slice of each chunk
        self.carry.keep_last_keys(batch["input_ids"].shape[1] * self.layout.context_parallel)  # one chunk of keys
        return out.loss

    def _skips_on_device(self) -> bool:
        return bool(self.optimizer.defaults.get("fused")) and self._plain_params

    def _set_learning_rate(self, step: int) -> float:
        lr = lr_at(step, peak=self.optim.lr, warmup_steps=self.optim.warmup_steps, max_steps=self.loop.max_steps,
                     min_ratio=self.optim.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.raw_model.set_inner_lr_scale(step, self.optim.warmup_steps)
        return lr

    # --- Evaluation ---

    def evaluate(self) -> dict[str, float]:
        """Mean loss over the fixed validation windows (token-weighted, over all processes), and its perplexity."""
        mean = mean_loss_all(self.raw_model, self.data.val_set.batches(self.data.train_loader.batch_size),
                             self.layout)  # split over the context group like training
        return self.records.validation(mean, math.exp(min(mean, 50.0)))

    def _time_inference(self) -> None:
        """Prefill and cached decode on a fixed validation prompt (training/inference.py)."""
        if self.layout.is_main or self.layout.shards_parameters:  # sharded: every rank runs it
            record, sample = inference_report(self.raw_model, self.data, self.device, self.layout.autocast())
            self._log(record)
            if sample is not None:
                self.logger.log_text(C.INFERENCE_SAMPLE, sample, step=self.step)

    def _final_reports(self) -> None:
        """Perplexity by position, passkey retrieval and the plots (training/long_context.py). Sharded parameters:
        every rank runs the model; context parallel: the first data group runs it with each sequence split."""
        layout = self.layout
        if layout.is_main or layout.shards_parameters or (layout.context is not None and layout.data_rank == 0):
            self.records.final_extras = final_reports(self.raw_model, self.data, self.run_dir, self.logger, self.step,
                                                      self.loop, self.passkey, layout.autocast(),
                                                      main=layout.is_main, context=layout.context)

    def _log(self, record: Mapping[str, Any]) -> None:  # rank 0 only
        self.records.log(record, self.step)

    def summary(self) -> dict[str, Any]:
        """The run's summary so far (training/records.py): also the summary of a run that failed."""
        return self.records.summary(step=self.step, tokens_seen=self.tokens_seen,
                                    data_hash=self.token_hash.digest if self.token_hash.batches else None)

    def _after_nonfinite_window(self, window_steps: int) -> None:
        """Some steps since the last record were not finite: stop if the weights are not, or if every step was
        bad for at least ``trainer.max_bad_steps`` (skipped on the device, so the weights are still good)."""
        if not self.checkpoints.weights_finite():
            raise self.guard.diverged(self.step, self.checkpoints.latest())
        if self._skips_on_device() and self.guard.window_all_bad(self.step, window_steps):
            raise self.guard.every_step_bad(window_steps, self.save())

    # --- Checkpoints: what the loop owns; the CheckpointManager writes and reads them ---

    def _loop_state(self) -> dict[str, Any]:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "carry": self.carry,
                "token_hash": self.token_hash.state_dict(), **self.records.state_dict()}

    def state_dict(self, weights: bool = True) -> dict[str, Any]:
        """The whole checkpoint (``weights=False``: all but the model and optimizer)."""
        return self.checkpoints.state_dict(self._loop_state(), weights=weights)

    def save(self) -> Path | None:
        """Every rank takes part. Weights that are not finite are never written: the run stops instead (the last
        good checkpoint stays)."""
        if not self.checkpoints.weights_finite():
            raise self.guard.diverged(self.step, self.checkpoints.latest())
        final = self.step >= self.loop.max_steps or self.preemption.requested()
        return self.checkpoints.save(self._loop_state(), final=final)

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint (any format, any world size)."""
        loop = self.checkpoints.restore(state, self.stream,
                                        lambda carry: TTTCache.from_state_dict(carry, self.device))
        self.carry = loop["carry"] if loop["carry"] is not None else self.carry
        self.step, self.tokens_seen = loop["step"], loop["tokens_seen"]
        self.records.load_state_dict(loop)
        self.token_hash.load_state_dict(loop["token_hash"])
