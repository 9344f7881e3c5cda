"""Start one worker per local device with torch's elastic launcher, or join the world we were started in.

``python -m tttexp.train strategy=multi_gpu_state_passing`` needs no torchrun: the Hydra job (one run directory)
starts ``distributed.nproc_per_node`` workers itself. Under torchrun or SLURM the processes already form a world;
each one runs the job directly and the strategy joins that world.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from tttexp.distributed.world import free_port, in_existing_world, process_rank


def resolve_nproc(value: Any) -> int:
    """``distributed.nproc_per_node``: a number, or ``auto`` = one per visible GPU."""
    if value == "auto":
        count = torch.cuda.device_count()
        if count == 0:
            from tttexp.distributed.strategy import warn

            warn("distributed.nproc_per_node=auto counts GPUs and none is visible: running ONE process on the CPU; "
                 "for several give a number, e.g. distributed.nproc_per_node=2")
            return 1
        return count
    return int(value)


def needs_launch(cfg: DictConfig) -> bool:
    """True for a DDP strategy with more than one local process that is not yet inside a world."""
    is_ddp = str(cfg.distributed._target_).endswith("DistributedDataParallel")
    return is_ddp and not in_existing_world() and resolve_nproc(cfg.distributed.nproc_per_node) > 1


def launch(cfg: DictConfig, run_dir: Path, job: Callable[[DictConfig, Path], Any]) -> Any:
    """Run ``job(cfg, run_dir)`` in ``nproc_per_node`` local workers; returns rank 0's result. A worker that dies
    ends all. ``job`` must be a module-level function (workers are spawned and receive it by reference)."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    nproc = resolve_nproc(cfg.distributed.nproc_per_node)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"tttexp-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        max_restarts=0,
        monitor_interval=1.0,
        start_method="spawn",
        logs_specs=DefaultLogsSpecs(log_dir=str(run_dir / "elastic")),
    )
    container = OmegaConf.to_container(cfg, resolve=True)
    results = elastic_launch(config, worker)(job, container, str(run_dir))
    return results.get(0) if isinstance(results, dict) else results


def worker(job: Callable[[DictConfig, Path], Any], config: dict, run_dir: str) -> Any:
    """One process of a launched job: its own log file, then the same ``job`` as a single-process run."""
    rank = process_rank()
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    (path / f"rank{rank}.pid").write_text(str(os.getpid()))
    handler = logging.FileHandler(path / f"train_rank{rank}.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    if rank != 0:
        log = open(path / f"train_rank{rank}.log", "a", buffering=1)  # noqa: SIM115 - lives as long as the worker
        sys.stdout = sys.stderr = log
    return job(OmegaConf.create(config), path)
