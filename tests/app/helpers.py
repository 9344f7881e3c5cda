"""Shared test helpers: build the app's pieces in-process from a composed config."""

from __future__ import annotations

import json
import os
from pathlib import Path

from hydra.utils import instantiate

from tttexp.app.preflight import compose_config
from tttexp.app.train import build_model_and_data
from tttexp.training.trainer import LoopSettings, OptimSettings, Trainer


def build_trainer(overrides: list[str], run_dir: Path, cache_dir: Path, logger=None) -> Trainer:
    """A Trainer exactly as ``train.run`` builds it (without the logger backend unless given)."""
    from omegaconf import OmegaConf

    from tttexp.loggers import NullLogger

    os.environ["TTTEXP_CACHE_DIR"] = str(cache_dir)
    cfg = compose_config(["experiment=smoke", "logging=none", *overrides])
    strategy = instantiate(cfg.strategy, backend="gloo", timeout_s=60)
    strategy.setup(cfg.device, cfg.seed)
    data = instantiate(cfg.data)
    model, _ = build_model_and_data(cfg, strategy, data)
    model.config.kernel = strategy.kernel_for(cfg.model.kernel)
    return Trainer(
        model=model, data=data, strategy=strategy, logger=logger or NullLogger(),
        optim=OptimSettings(**OmegaConf.to_container(cfg.optim, resolve=True)),
        loop=LoopSettings(**OmegaConf.to_container(cfg.trainer, resolve=True)),
        run_dir=run_dir,
    )


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def last_by_step(run_dir: Path, key: str) -> dict[int, float]:
    """The last logged value of ``key`` at each step (a resumed run re-logs steps after its checkpoint)."""
    out: dict[int, float] = {}
    for row in records(run_dir):
        if key in row:
            out[row["step"]] = row[key]
    return out
