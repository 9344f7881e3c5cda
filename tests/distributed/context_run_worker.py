"""Runs of the real trainer with state passing (``strategy=multi_gpu_state_passing``) and sharded checkpoints at
several context-parallel degrees: one process in the test, or each rank of a spawned gloo world."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from support import build_trainer, records
from tttexp.distributed.world import process_rank
from tttexp.loggers import JsonlLogger
from tttexp.training.checkpoint import load_checkpoint

STEPS = 6
HALF = 3  # the checkpoint the resumed runs start from
ROWS = 2  # document streams (global rows) at every layout


def overrides(cp: int, data_groups: int, *extra: str) -> list[str]:
    """State passing on ``cp x data_groups`` processes (``single`` for one), ``ROWS`` streams in all, a sharded
    checkpoint every ``HALF`` steps, validation then, and the loss by position at the end."""
    world = cp * data_groups
    layout = ["distributed=single"] if world == 1 else ["distributed=ddp", f"distributed.context_parallel={cp}"]
    return ["strategy=multi_gpu_state_passing", *layout, f"data.batch_size={ROWS // data_groups}",
            "distributed.checkpoint=dcp", f"trainer.max_steps={STEPS}", f"trainer.ckpt_every={HALF}",
            "trainer.log_every=1", f"trainer.eval_every={HALF}", "trainer.progress=none",
            "trainer.position_eval_sequences=2", "trainer.plots=false", "device=cpu", *extra]


def train(args: list[str], run_dir: Path, cache: Path, resume: Path | None = None) -> dict:
    """Train to the end (resuming from ``resume`` if given). Returns, by step, the train loss, the carried state's
    norm and resets, and the validation loss; and the end-of-run summary."""
    run_dir.mkdir(parents=True, exist_ok=True)
    logger = JsonlLogger(run_dir / "metrics.jsonl")  # rank 0 writes
    logger.start(run_dir, {}, {})
    trainer = build_trainer(args, run_dir, cache, logger=logger)
    if resume is not None:
        trainer.restore(load_checkpoint(resume))
    summary = trainer.fit()
    logger.finish(summary)
    steps: dict[int, dict] = {}
    if process_rank() == 0:
        for row in (r for r in records(run_dir) if "step" in r and "_type" not in r):
            keep = {k: row[k] for k in ("train/loss", "state/w_norm", "state/resets", "val/loss") if k in row}
            steps.setdefault(int(row["step"]), {}).update(keep)
    trainer.layout.teardown()
    return {"steps": steps, "summary": {k: v for k, v in summary.items() if k.startswith("summary/")}}


def run_cases(rank: int, root: Path, cache: Path, cases: list) -> None:
    """Run ``cases`` in order on this rank of the current world: ``[name, cp, data_groups, extra overrides, resume
    from (a path under root, or None)]``; rank 0 writes each case's result to ``root/<name>.json``."""
    for name, cp, groups, extra, resume in cases:
        start = None if resume is None else root / resume
        result = train(overrides(cp, groups, *extra), root / name, cache, resume=start)
        if rank == 0:
            (root / f"{name}.json").write_text(json.dumps(result))


def run_rank(rank: int, world: int, port: int, root: str, cache: str, cases: list) -> None:
    """Each rank of a spawned gloo world: :func:`run_cases` (the trainer joins the world from the environment)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    run_cases(rank, Path(root), Path(cache), cases)
