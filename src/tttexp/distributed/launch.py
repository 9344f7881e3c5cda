"""Start one worker per local device with torch's elastic launcher, or join the world we were started in.

``python -m tttexp.train strategy=multi_gpu_state_passing`` needs no torchrun: the Hydra job (one run directory)
starts ``distributed.nproc_per_node`` workers itself. Under torchrun or SLURM the processes already form a world;
each one runs the job directly and the process layout joins that world.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from tttexp.console import copy_console_to
from tttexp.distributed.world import free_port, in_existing_world, process_rank
from tttexp.errors import TTTExpError


def resolve_nproc(value: Any, quiet: bool = False) -> int:
    """``distributed.nproc_per_node``: a number, or ``auto`` = one per visible GPU (``quiet``: no warning)."""
    if value == "auto":
        count = torch.cuda.device_count()
        if count == 0:
            if quiet:
                return 1
            from tttexp.distributed.layout import warn

            warn("distributed.nproc_per_node=auto counts GPUs and none is visible: running ONE process on the CPU; "
                 "for several give a number, e.g. distributed.nproc_per_node=2")
            return 1
        return count
    return int(value)


def needs_launch(cfg: DictConfig, quiet: bool = False) -> bool:
    """True for a multi-process layer (DDP, FSDP) with more than one local process, not yet inside a world."""
    multi = str(cfg.distributed._target_).endswith(("DistributedDataParallel", "FullyShardedDataParallel"))
    return multi and not in_existing_world() and resolve_nproc(cfg.distributed.nproc_per_node, quiet) > 1


def launch(cfg: DictConfig, run_dir: Path, job: Callable[[DictConfig, Path], Any],
           forwarder: SignalForwarder | None = None) -> Any:
    """Run ``job(cfg, run_dir)`` in ``nproc_per_node`` local workers; returns rank 0's result. A worker that dies
    ends all. ``job`` must be a module-level function (workers are spawned and receive it by reference).
    Preemption signals reach the workers through ``forwarder`` (its ``signal`` tells the caller afterwards)."""
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
        # elastic_launch writes this into TORCHELASTIC_SIGNALS_TO_HANDLE, and the agent then installs its own
        # teardown for each: SIGTERM must stay with the SignalForwarder (its default list has SIGTERM)
        signals_to_handle=ELASTIC_SIGNALS,
    )
    container = OmegaConf.to_container(cfg, resolve=True)
    for stale in [*run_dir.glob("rank*.pid"), run_dir / WORKER_ERROR]:
        stale.unlink(missing_ok=True)
    with forwarder or SignalForwarder(run_dir), _quiet_elastic():
        results = elastic_launch(config, worker)(job, container, str(run_dir))
    return results.get(0) if isinstance(results, dict) else results


@contextlib.contextmanager
def _quiet_elastic() -> Iterator[None]:
    """torch elastic logs a failed worker as dozens of ``E...`` lines (its traceback, once per wrapper) on the
    launcher's console; the job reports it in one line instead (:data:`WORKER_ERROR`, written by the worker,
    whose traceback goes to its own log). Its loggers are silenced while the workers run."""
    names = [name for name in list(logging.root.manager.loggerDict) if name.startswith(_ELASTIC_LOGGERS)]
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


_ELASTIC_LOGGERS = ("torch.distributed.elastic", "torch.distributed.launcher", "torch.multiprocessing")
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class SignalForwarder:
    """While the workers run, SIGTERM, SIGUSR1 and SIGUSR2 sent to this (launcher) process go to every worker,
    which checkpoints and returns; the launcher itself neither dies (SIGUSR1's default) nor tears the workers
    down (torch elastic's own SIGTERM handling, switched off for these signals meanwhile).

    ``signal`` is the last signal received; ``previous`` the handlers replaced (submitit's requeue on USR2)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.signal: int | None = None
        self.previous: dict[int, Any] = {}
        self._env: str | None = None

    def __enter__(self) -> SignalForwarder:
        if threading.current_thread() is not threading.main_thread():
            return self
        self._env = os.environ.get(_ELASTIC_SIGNALS)
        os.environ[_ELASTIC_SIGNALS] = ELASTIC_SIGNALS  # not SIGTERM: that one is forwarded
        for sig in FORWARDED_SIGNALS:
            self.previous[sig] = signal.signal(sig, self._forward)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        if self.previous:
            if self._env is None:
                os.environ.pop(_ELASTIC_SIGNALS, None)
            else:
                os.environ[_ELASTIC_SIGNALS] = self._env

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        self.signal = signum
        for pid_file in self.run_dir.glob("rank*.pid"):
            with contextlib.suppress(OSError, ValueError):  # a worker that is gone, or a file being written
                os.kill(int(pid_file.read_text().strip()), signum)

    def hand_over(self) -> bool:
        """After the workers' checkpoint: let a handler this replaced (submitit's requeue) act on the signal."""
        previous = self.previous.get(self.signal) if self.signal is not None else None
        if callable(previous) and self.signal == signal.SIGUSR2:
            previous(self.signal, None)
            return True
        return False


_ELASTIC_SIGNALS = "TORCHELASTIC_SIGNALS_TO_HANDLE"
ELASTIC_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"  # the signals torch elastic's agent may turn into a teardown
LAUNCHED_WORKER = "TTTEXP_LAUNCHED_WORKER"  # set in launched workers: the launcher, not they, requeues the job


def worker(job: Callable[[DictConfig, Path], Any], config: dict, run_dir: str) -> Any:
    """One process of a launched job: its own log file, then the same ``job`` as a single-process run."""
    rank = process_rank()
    os.environ[LAUNCHED_WORKER] = "1"
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    (path / f"rank{rank}.pid").write_text(str(os.getpid()))
    handler = logging.FileHandler(path / f"train_rank{rank}.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    if rank != 0:
        log = open(path / f"train_rank{rank}.log", "a", buffering=1)  # noqa: SIM115 - lives as long as the worker
        sys.stdout = sys.stderr = log
    else:  # rank 0 speaks for the job: its console also goes to the job's train.log
        copy_console_to(path / "train.log")
    try:
        return job(OmegaConf.create(config), path)
    except TTTExpError as err:  # a one-line problem (a config, a checkpoint): the launcher prints it as it is
        _record_error(path, str(err))
        raise
    except Exception as err:  # a failure without a one-line message: the traceback goes to this rank's log
        logging.getLogger(__name__).exception("rank %d failed", rank)
        text = " ".join(f"{type(err).__name__}: {err}".split())[:300]
        _record_error(path, f"rank {rank} failed: {text} (traceback in {path / f'train_rank{rank}.log'})")
        raise


def _record_error(run_dir: Path, message: str) -> None:
    """The job's error line: the first worker to fail writes it (the others fail because it did)."""
    with contextlib.suppress(OSError):
        fd = os.open(run_dir / WORKER_ERROR, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{message}\n")


WORKER_ERROR = "worker_error.txt"  # a launched worker's one-line error, for the launcher to print
