"""The training loop: micro-batches, accumulation, clipping, LR schedule, eval, checkpoints and metrics.

Read top to bottom: :meth:`Trainer.fit` is the loop; everything it calls is below it in the order it is used.
The trainer talks to a :class:`tttexp.loggers.Logger` (never to wandb) and to a
:class:`tttexp.distributed.Strategy` (never to torch.distributed directly).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tttexp.data import integrity
from tttexp.distributed import Strategy
from tttexp.errors import TrainingStopped
from tttexp.models import TTTCache, TTTForCausalLM
from tttexp.training import checkpoint as ckpt
from tttexp.training import dcp, reshard, rundir
from tttexp.training import metrics as M
from tttexp.training.config import OptimConfig, TrainerConfig
from tttexp.training.fairness import TokenHash
from tttexp.training.inference import time_inference
from tttexp.training.metrics import Window
from tttexp.training.preemption import Preempted, PreemptionFlag, requeue_slurm_job
from tttexp.training.schedule import lr_at
from tttexp.training.validation import mean_loss


class Trainer:
    def __init__(
        self,
        *,
        model: TTTForCausalLM,
        data: Any,
        strategy: Strategy,
        logger: Any,
        optim: OptimConfig,
        loop: TrainerConfig,
        run_dir: Path,
        health: Any | None = None,
        resume_state: dict[str, Any] | None = None,
        fingerprint: dict[str, Any] | None = None,
        passkey: Any | None = None,
    ) -> None:
        self.raw_model = model
        self.data = data
        self.strategy = strategy
        self.logger = logger
        self.optim = optim
        self.loop = loop
        self.run_dir = Path(run_dir)
        self.health = health
        self.fingerprint = fingerprint  # the config values a resume must match (training/rundir.py)
        self.passkey = passkey  # PasskeyConfig: passkey retrieval at the end (training/passkey.py)
        self.token_hash = TokenHash()  # the training tokens consumed, in order (the study's fairness record)
        self.final_extras: dict[str, float] = {}
        self.device = strategy.device
        self.model = strategy.prepare_model(model)
        self.optimizer = self._build_optimizer()
        # sharded (DTensor) parameters keep the log-step check only; plain ones may skip a bad step on the device
        self._plain_params = not any(hasattr(p, "to_local") for p in self.raw_model.parameters())
        self.checkpointer = dcp.ShardedCheckpointer(strategy, async_save=strategy.async_checkpoint)
        self.stream = bool(getattr(data, "stream", False))  # per-row streams: carry each row's TTT state
        # trainer.check_batches: the first step whose batch changed between the loader and its use (0: none yet)
        self.changed_at = torch.zeros((), dtype=torch.long, device=self.device) if loop.check_batches else None
        self.preemption = PreemptionFlag()
        self.step = 0
        self.tokens_seen = 0
        self.carry: TTTCache | None = None
        self.bad_steps_in_a_row = 0
        self.clock = M.RunClock()  # fit() starts its own; this one serves a summary asked for before fit
        self._frames_after_first_step: int | None = None  # torch.compile's frame count after the first step
        self.counters: dict[str, int] = {"warnings/nonfinite_steps": 0}
        self.resets = 0
        self.history: list[dict[str, float]] = []
        self.last_val: dict[str, float] = {}
        self.window = Window(self.device)  # steps since the last record, summed on the device
        self._window_nonfinite = 0
        self._diverged = False  # the weights went non-finite: the run's last loss is not a number
        config = model.config
        self.flops_per_token = M.train_flops_per_token(
            sum(p.numel() for p in model.parameters()),
            M.mixer_flops_per_token([config.mixer(i) for i in range(config.num_hidden_layers)], config.hidden_size,
                                    config.num_attention_heads, config.mini_batch_size, config.ttt_layer,
                                    data.seq_len),
        )
        self.peak = M.peak_flops(self.device)
        if resume_state is not None:
            self._restore(resume_state)

    # ------------------------------------------------------------------------------------------------------------
    # The loop
    # ------------------------------------------------------------------------------------------------------------

    def _save_tokenizer(self) -> None:
        """Keep the run's tokenizer in its directory (rank 0, once), so that an export is a complete model."""
        tokenizer = getattr(self.data, "tokenizer", None)
        target = self.run_dir / rundir.TOKENIZER_DIR
        if not self.strategy.is_main or tokenizer is None or target.exists():
            return
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            if tokenizer.save_pretrained(tmp):
                os.replace(tmp, target)
        except Exception as err:  # noqa: BLE001 - a tokenizer that cannot be saved must not stop training
            print(f"warning: the tokenizer was not kept in {target} ({type(err).__name__}: "
                  f"{str(err).splitlines()[0][:120] if str(err) else ''}); an export will hold the model only",
                  file=sys.stderr, flush=True)

    def fit(self) -> dict[str, Any]:
        """Train to ``max_steps``; returns the run summary (also written to summary.json by the logger)."""
        self.clock = M.RunClock()
        progress = Progress(self.loop.progress, self.loop.max_steps, self.step, enabled=self.strategy.is_main)
        watch = M.Stopwatch(self.device)
        self.window = Window(self.device)
        tokens_per_step = self._tokens_per_step()
        first_step = self.step + 1  # of this process: it compiles, so it is timed on its own
        first_seconds = 0.0
        self._save_tokenizer()
        self.preemption.install()
        self.model.train()
        try:
            while self.step < self.loop.max_steps:
                lr = self._set_learning_rate(self.step)
                loss, grad_norm, ok = self._train_step()
                self.step += 1
                self.tokens_seen += tokens_per_step
                self.clock.tokens += tokens_per_step
                self.window.add(loss, grad_norm, ok, tokens_per_step)
                if self.step == first_step:
                    first_seconds = watch.lap()
                    self.clock.add("compile", first_seconds)
                    self._frames_after_first_step = M.compiled_frames()

                if self.step % self.loop.log_every == 0 or self.step == self.loop.max_steps:
                    seconds = watch.lap()
                    self.clock.window(self.window.tokens - (tokens_per_step if first_seconds else 0), seconds)
                    record = self._train_record(self.window, lr, seconds + first_seconds)
                    first_seconds = 0.0
                    self._log(record)
                    progress.update(self.step, record)
                    window_steps, self.window = self.window.steps, Window(self.device)
                    self._check_batches()
                    if self._window_nonfinite:
                        self._after_nonfinite_window(window_steps)
                if self._every(self.loop.eval_every):
                    self._timed("eval", lambda: self._log(self.evaluate()), watch)
                if self._every(self.loop.inference_every):
                    self._timed("eval", self._time_inference, watch)
                if self._every(self.loop.ckpt_every):
                    self.save()
                    watch.restart()
                if self._preempted():
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
        self.clock.add(phase, time.perf_counter() - start)

    def _check_batches(self) -> None:
        """``trainer.check_batches``: stop if a batch changed between the loader and its step (one host sync)."""
        if self.changed_at is None:
            return
        step = int(self.strategy.all_reduce_max(self.changed_at.float()))
        if step:
            raise TrainingStopped(
                f"the training batch of step {step} changed between the loader and the step that read it "
                "(trainer.check_batches); the weights were not saved. Run with data.prefetch=false and report it"
            )

    def _every(self, period: int) -> bool:
        """A periodic action due at this step (the final step has its own end-of-run actions)."""
        return bool(period) and self.step % period == 0 and self.step < self.loop.max_steps

    def _preempted(self) -> bool:
        """Has any process been signalled? One process needs no device tensor (and so no host sync)."""
        if self.strategy.world_size == 1:
            return self.preemption.requested()
        flag = torch.tensor(1.0 if self.preemption.requested() else 0.0, device=self.device)
        return bool(self.strategy.all_reduce_max(flag) > 0)

    # ------------------------------------------------------------------------------------------------------------
    # One optimizer step
    # ------------------------------------------------------------------------------------------------------------

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
            batch = self.strategy.local_batch({k: v.to(self.device, non_blocking=True) for k, v in raw.items()})
            with self.strategy.no_sync(self.model, last_micro_batch=micro == accum - 1), self.strategy.autocast():
                loss = self._forward_loss(batch)
            (loss / accum).backward()
            total += loss.detach()
            if self.changed_at is not None:  # after the step has read the batch: a change at any time shows
                self.changed_at = torch.where((self.changed_at == 0) & integrity.changed(batch), self.step + 1,
                                              self.changed_at)
        loss = self.strategy.all_reduce_mean(total / accum)
        params = [p for p in self.raw_model.parameters() if p.grad is not None]
        grad_norm = self.strategy.grad_norm(params, self.optim.max_grad_norm)  # clips when max_grad_norm > 0
        if self.loop.skip_nonfinite:
            if not bool(torch.isfinite(loss) & torch.isfinite(grad_norm)):
                self._skip_bad_step()
                return loss, grad_norm, False
            self.bad_steps_in_a_row = 0
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
        if starts is not None:
            self.resets = self.resets + starts.sum()
        out = self.model(batch["input_ids"], labels=batch["labels"], cache=cache, use_cache=True, doc_starts=starts)
        self.carry = out.cache.detach()
        self.carry.keep_last_keys(batch["input_ids"].shape[1])  # attention layers carry one chunk of keys, not all
        return out.loss

    def _skips_on_device(self) -> bool:
        return bool(self.optimizer.defaults.get("fused")) and self._plain_params

    def _skip_bad_step(self) -> None:
        """A non-finite step: gradients dropped, weights and optimizer untouched; too many in a row stop the run."""
        self.optimizer.zero_grad(set_to_none=True)
        self.bad_steps_in_a_row += 1
        self.counters["warnings/nonfinite_steps"] += 1
        if self.strategy.is_main:
            print(f"warning: step {self.step + 1}: non-finite loss or gradients; step skipped "
                  f"({self.bad_steps_in_a_row} in a row)", file=sys.stderr, flush=True)
        if self.bad_steps_in_a_row >= self.loop.max_bad_steps:
            self.step += 1
            path = self.save()
            raise TrainingStopped(
                f"{self.bad_steps_in_a_row} non-finite steps in a row (trainer.max_bad_steps="
                f"{self.loop.max_bad_steps}); the last good weights are in {path}. Lower optim.lr or check the data"
            )

    def _set_learning_rate(self, step: int) -> float:
        lr = lr_at(step, peak=self.optim.lr, warmup_steps=self.optim.warmup_steps, max_steps=self.loop.max_steps,
                     min_ratio=self.optim.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.raw_model.set_inner_lr_scale(step, self.optim.warmup_steps)
        return lr

    def _build_optimizer(self) -> torch.optim.Optimizer:
        decay = [p for p in self.raw_model.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.raw_model.parameters() if p.requires_grad and p.dim() < 2]
        groups = [{"params": decay, "weight_decay": self.optim.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        extra = {"fused": True} if self.device.type == "cuda" else {}
        return torch.optim.AdamW(groups, lr=self.optim.lr, betas=tuple(self.optim.betas), eps=self.optim.eps, **extra)

    def _tokens_per_step(self) -> int:
        return self.data.train_loader.tokens_per_batch * self.loop.grad_accum_steps * self.strategy.data_world_size

    # ------------------------------------------------------------------------------------------------------------
    # Evaluation
    # ------------------------------------------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Mean loss over the fixed validation windows (token-weighted, over all processes), and its perplexity."""
        batches = self.data.val_set.batches(self.data.train_loader.batch_size)
        total, count = mean_loss(self.raw_model, batches, autocast=self.strategy.autocast())
        sums = self.strategy.all_reduce_mean(torch.tensor([total, float(count)], dtype=torch.float64,
                                                          device=self.device))
        mean = float(sums[0] / sums[1].clamp_min(1))
        self.last_val = {"val/loss": mean, "val/ppl": math.exp(min(mean, 50.0))}
        return dict(self.last_val)

    def _time_inference(self) -> None:
        """Prefill and cached decode on a fixed validation prompt; logs ``inference/*`` and a short sample."""
        if not self.strategy.is_main and not self.strategy.shards_parameters:  # sharded: every rank runs it
            return
        prompt = next(self.data.val_set.batches(1))["input_ids"][:, :64].to(self.device)
        record, generated = time_inference(self.raw_model, prompt, new_tokens=32, autocast=self.strategy.autocast())
        self._log(record)
        tokenizer = getattr(self.data, "tokenizer", None)
        if tokenizer is not None:
            text = tokenizer.decode(prompt[0].tolist()) + " ▶ " + tokenizer.decode(generated[0].tolist())
            self.logger.log_text("inference/sample", text, step=self.step)

    def _final_reports(self) -> None:
        """Perplexity by position up to 4x the training length and, when enabled, passkey retrieval (tables, CSVs,
        plots: training/long_context.py), and the loss-curve plot."""
        if not self.strategy.is_main and not self.strategy.shards_parameters:  # sharded: every rank runs the model
            return
        from tttexp.training.long_context import context_reports

        main = self.strategy.is_main
        _rows, self.final_extras = context_reports(
            self.raw_model, self.data, self.run_dir, self.logger, self.step, length=self.loop.position_eval_len,
            sequences=self.loop.position_eval_sequences, passkey=self.passkey, autocast=self.strategy.autocast(),
            plots=self.loop.plots and main, write=main, batch_size=self.data.train_loader.batch_size,
        )
        if self.loop.plots and main:
            from tttexp.training import plots

            loss_png = plots.plot_losses(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png") \
                if (self.run_dir / "metrics.jsonl").exists() else None
            if loss_png is not None:
                self.logger.log_image("plots/loss", loss_png, step=self.step)

    # ------------------------------------------------------------------------------------------------------------
    # Records
    # ------------------------------------------------------------------------------------------------------------

    def _train_record(self, window: Window, lr: float, seconds: float) -> dict[str, float]:
        loss, grad_norm = window.means()
        self._window_nonfinite = window.nonfinite()
        self.counters["warnings/nonfinite_steps"] += self._window_nonfinite
        tps = M.tokens_per_second(window.tokens, seconds)
        record: dict[str, float] = {
            "train/loss": loss,
            "train/learning_rate": lr,
            "train/grad_norm": grad_norm,
            "train/nonfinite_steps": self._window_nonfinite,  # left out of the two means above
            "train/tokens_per_sec": tps,
            "train/tokens_seen": self.tokens_seen,
            "train/step_time_ms": 1000.0 * seconds / max(1, window.steps),
            "system/num_processes": self.strategy.world_size,
        }
        utilisation = M.mfu(tps, self.flops_per_token, self.peak * self.strategy.world_size if self.peak else None)
        if utilisation is not None:
            record["system/mfu"] = utilisation
        record.update(M.memory(self.device))
        if self.stream and self.carry is not None:
            record.update(self._state_record())
        if self._frames_after_first_step is not None:
            self.counters["warnings/recompiles"] = M.compiled_frames() - self._frames_after_first_step
        record.update(self.counters)
        if self.health is not None:
            for warning in self.health.update(self.step, record):
                self._warn_once(warning)
            record.update(self.health.counts())
        self.history.append({"step": self.step, **{k: v for k, v in record.items() if k.startswith("train/")}})
        return record

    def _state_record(self) -> dict[str, float]:
        norms = [layer.ttt[0].float().norm(dim=(-2, -1)).mean() for layer in self.carry.layers if layer.ttt]
        record = {"state/resets": int(self.resets)}
        if norms:
            record["state/w_norm"] = float(torch.stack(norms).mean())
        return record

    def _warn_once(self, warning: Any) -> None:
        seen = getattr(self, "_warned", set())
        if warning.kind not in seen and self.strategy.is_main:
            print(f"warning: {warning.message}", file=sys.stderr, flush=True)
            self.logger.alert(f"tttexp: {warning.kind}", warning.message)
        seen.add(warning.kind)
        self._warned = seen

    def _log(self, record: Mapping[str, Any]) -> None:
        if self.strategy.is_main:
            self.logger.log(dict(record), step=self.step)

    def summary(self) -> dict[str, Any]:
        """The run's summary so far: wall time by phase, steady-state tokens/s (compile and evaluation left out;
        ``wall_tokens_per_sec`` spreads everything), the last losses, counters and end-of-run reports."""
        losses = [h["train/loss"] for h in self.history if "train/loss" in h]  # the last one, finite or not
        summary = {
            **self.clock.summary(),
            "summary/final_loss": losses[-1] if losses and not self._diverged else float("nan"),
            "summary/steps": self.step,
            "summary/tokens_seen": self.tokens_seen,
            "summary/train_flops": self.tokens_seen * self.flops_per_token,  # the compute spent, as MFU counts it
        }
        if self.last_val:
            summary["summary/final_val_loss"] = self.last_val["val/loss"]
            summary["summary/final_val_ppl"] = self.last_val["val/ppl"]
        summary.update({k.replace("warnings/", "summary/warnings_"): v for k, v in self._counters_now().items()})
        summary.update(self.final_extras)
        if self.token_hash.batches:
            summary["summary/data_hash"] = self.token_hash.digest
        return summary

    def _counters_now(self) -> dict[str, int]:
        """The counters with the steps not yet logged (one host sync; for checkpoints and the summary)."""
        counters = dict(self.counters)
        counters["warnings/nonfinite_steps"] += self.window.nonfinite()
        return counters

    # ------------------------------------------------------------------------------------------------------------
    # Non-finite weights: never saved, never reported as success
    # ------------------------------------------------------------------------------------------------------------

    def _weights_finite(self) -> bool:
        """Are all weights and optimizer moments finite, on every process? One host sync."""
        tensors = [p.detach() for p in self.raw_model.parameters()]
        tensors += [v for state in self.optimizer.state.values() for v in state.values()
                    if torch.is_tensor(v) and v.is_floating_point()]
        tensors = self.strategy.local_tensors(tensors)  # this process's shards under FSDP
        bad = (~torch.stack([torch.isfinite(t).all() for t in tensors]).all()).float()
        if self.strategy.world_size > 1:
            bad = self.strategy.all_reduce_max(bad)
        return not bool(bad > 0)

    def _after_nonfinite_window(self, window_steps: int) -> None:
        """Some steps since the last record were not finite: stop if the weights are not, or if every step was
        bad for at least ``trainer.max_bad_steps`` (skipped on the device, so the weights are still good)."""
        if not self._weights_finite():
            self._stop_nonfinite()
        if not self._skips_on_device():
            return
        if self.strategy.is_main:
            print(f"warning: steps {self.step - window_steps + 1}-{self.step}: {self._window_nonfinite} non-finite "
                  "step(s) skipped", file=sys.stderr, flush=True)
        if self._window_nonfinite >= window_steps >= self.loop.max_bad_steps:
            path = self.save()
            raise TrainingStopped(
                f"every one of the last {window_steps} steps was non-finite (trainer.max_bad_steps="
                f"{self.loop.max_bad_steps}); the last good weights are in {path}. Lower optim.lr or check the data"
            )

    def _stop_nonfinite(self) -> None:
        self._diverged = True
        last = ckpt.list_checkpoints(self.run_dir)
        where = f"the last good checkpoint is {last[0]}" if last else "no checkpoint was written"
        raise TrainingStopped(
            f"the weights are not finite at step {self.step} ({self._counters_now()['warnings/nonfinite_steps']} "
            f"non-finite steps); nothing was saved and {where}. Lower optim.lr, or set trainer.skip_nonfinite=true "
            "to skip bad steps"
        )

    # ------------------------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------------------------

    def _rank_state(self) -> dict[str, Any]:
        """What differs between processes: data position, RNG streams and the carried TTT state."""
        return {
            "data": self.data.train_loader.state_dict(),
            "rng": ckpt.rng_state(),
            "carry": self.carry.state_dict() if self.carry is not None else None,
        }

    def state_dict(self, weights: bool = True) -> dict[str, Any]:
        """The whole checkpoint (``weights=False``: all but the model and optimizer, which a sharded checkpoint
        writes itself)."""
        ranks = self.strategy.gather_object(self._rank_state())
        run_id_file = self.run_dir / "wandb_run_id"
        model, optimizer = self.strategy.full_state(self.raw_model, self.optimizer) if weights else (None, None)
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "world_size": self.strategy.world_size,
            "global_rows": self.data.train_loader.batch_size * self.strategy.world_size,  # for resharding
            "model_config": self.raw_model.config.to_dict(),  # export rebuilds the model from it
            **({"model": model, "optimizer": optimizer} if weights else {}),
            "ranks": ranks,
            "counters": self._counters_now(),
            "token_hash": self.token_hash.state_dict(),
            "fingerprint": self.fingerprint,
            "history": list(self.history),
            "wandb_run_id": run_id_file.read_text().strip() if run_id_file.exists() else None,
        }

    def save(self) -> Path | None:
        """Every rank takes part (its state is gathered); rank 0 writes; all wait for the file. Weights that are not
        finite are never written: the run stops instead (the last good checkpoint stays)."""
        if not self._weights_finite():
            self._stop_nonfinite()
        if self.strategy.checkpoint_format == "dcp":
            return self._save_sharded()
        state = self.state_dict()
        path = None
        if self.strategy.is_main:
            path = ckpt.save_checkpoint(self.run_dir, self.step, state, keep_last=self.loop.keep_last)
        self.strategy.barrier()
        return path

    def _save_sharded(self) -> Path:
        """A DCP checkpoint directory: every rank writes its shards, rank 0 the rest (training/dcp.py)."""
        path = ckpt.checkpoint_path(self.run_dir, self.step).with_suffix(dcp.SUFFIX)
        path = self.checkpointer.save(path, self.raw_model, self.optimizer, self.state_dict(weights=False),
                                      self.loop.keep_last,
                                      prune=lambda keep: ckpt.prune_checkpoints(self.run_dir, self.step, keep))
        if self.step >= self.loop.max_steps or self.preemption.requested():
            self.checkpointer.wait()
        return path

    def _restore(self, state: dict[str, Any]) -> None:
        """Load a checkpoint of any format written at any world size (training/reshard.py has the rule)."""
        if state.get("format") == "dcp":
            dcp.load_into(Path(state["path"]), self.raw_model, self.optimizer, state)
        else:
            if self.strategy.shards_parameters:
                dcp.check_fits("the checkpoint", {k: tuple(v.shape) for k, v in state["model"].items()},
                               self.raw_model, state.get("model_config"))
            try:
                self.strategy.load_full_state(self.raw_model, self.optimizer, state["model"], state["optimizer"])
            except RuntimeError as err:
                raise ckpt.CheckpointError(f"the checkpoint's model does not fit this one: "
                                           f"{ckpt.shape_mismatches(err)}; resume with the model settings it was "
                                           "written with") from None
        loader = self.data.train_loader
        mine = reshard.rank_state(state, self.strategy.rank, self.strategy.world_size, rows_per_rank=loader.batch_size,
                                  stream=self.stream, batches_per_epoch=getattr(loader, "batches_per_epoch", None))
        loader.load_state_dict(mine["data"])
        if mine["rng"] is not None:
            ckpt.restore_rng_state(mine["rng"])
        else:
            reshard.reseed(self.strategy.seed, int(state["step"]), self.strategy.rank)
        if mine.get("carry") is not None:
            self.carry = TTTCache.from_state_dict(mine["carry"], self.device)
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.counters.update({k: int(v) for k, v in state.get("counters", {}).items()})
        self.history = list(state.get("history", []))
        self.token_hash.load_state_dict(state.get("token_hash"))


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
        text = f"loss {record['train/loss']:.4f}  tok/s {record['train/tokens_per_sec']:,.0f}"
        lr = record["train/learning_rate"]
        line = f"step {step:>6}/{self.total}  {text}  lr {lr:.2e}  grad {record['train/grad_norm']:.3f}"
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

