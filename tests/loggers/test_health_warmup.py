"""The training-warning monitor fires in a run of ordinary length: its warm-up counts steps, not records. A spike,
a throughput drop and state-norm growth injected into a short real run come back from metrics.jsonl and from
the wandb record."""

from __future__ import annotations

import time

import torch

from support import build_trainer, records
from tttexp.loggers import HealthMonitor, JsonlLogger, LoggerGroup, WandbLogger, find_run_files, read_run


def test_the_first_check_comes_after_warmup_steps_not_warmup_records():
    monitor = HealthMonitor()  # warmup=20 (steps)
    for step in (10, 20, 30):
        assert monitor.update(step, {"train/loss": 5.0, "train/tokens_per_sec": 1000.0}) == []
    found = monitor.update(40, {"train/loss": 9.0, "train/tokens_per_sec": 100.0})
    assert {w.kind for w in found} == {"loss_spike", "throughput_drop"}  # at step 40 with log_every=10


def test_injected_trouble_is_reported_in_metrics_and_in_wandb(tmp_path, app_cache, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    logger = LoggerGroup([JsonlLogger(), WandbLogger(mode="offline", run_name="health")])
    trainer = build_trainer(["data.stream=true", "trainer.reset_on_document=false", "trainer.max_steps=16",
                             "trainer.log_every=2", "trainer.eval_every=0", "trainer.position_eval_sequences=0",
                             "trainer.plots=false", "trainer.progress=none", "optim.lr=1e-3"],
                            tmp_path, app_cache, logger=logger)
    trainer.records.health = HealthMonitor(warmup=6, state_window=6)  # the app's monitor, scaled to a 16-step run
    final_norm = dict(trainer.raw_model.named_parameters())["model.norm.weight"]
    step_once = trainer._train_step
    took: list[float] = []

    def troubled_step():
        upcoming = trainer.step + 1
        if upcoming in (9, 10):
            time.sleep(3 * sorted(took)[len(took) // 2])  # a stalled machine: throughput drops in the record of step 10
        if upcoming == 11:
            with torch.no_grad():
                final_norm.mul_(40.0)  # a bad update: the loss spikes in the record of step 12
        if upcoming > 6 and trainer.carry is not None:
            for layer in trainer.carry.layers:
                if layer.ttt:
                    layer.ttt[0].mul_(1.5)  # the carried state grows, record after record
        start = time.perf_counter()
        result = step_once()
        took.append(time.perf_counter() - start)
        return result

    trainer._train_step = troubled_step
    logger.start(tmp_path, {}, {"model/hidden_size": 64})
    trainer.fit()
    logger.finish(trainer.summary())

    expected = {"warnings/loss_spike", "warnings/throughput_drop", "warnings/state_growth"}
    last = [r for r in records(tmp_path) if "train/loss" in r][-1]
    assert all(last[key] >= 1 for key in expected), {k: last[k] for k in expected}
    alerts = {r["title"] for r in records(tmp_path) if r.get("_type") == "alert"}
    assert {"tttexp: loss_spike", "tttexp: throughput_drop", "tttexp: state_growth"} <= alerts

    recorded = read_run(find_run_files(tmp_path)[0])
    final = [row for row in recorded.history if "warnings/loss_spike" in row][-1]
    assert all(final[key] >= 1 for key in expected), {k: final[k] for k in expected}
    assert int(final["train/step"]) == 16
    assert "system/gpu_memory_allocated" in final and "system/host_memory_rss" in final  # on the CPU too
    assert final["system/gpu_memory_allocated"] == 0
