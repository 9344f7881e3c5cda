"""The app: ``python -m tttexp.train [group=option ...] [key=value ...]`` (``-m`` for sweeps).

Compose and check the config, set up the process layout, build the data, model and logger (app/build.py), and hand
them to the :class:`tttexp.training.trainer.Trainer`. No training logic lives here.
"""

from __future__ import annotations

import functools
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from tttexp.app import preflight
from tttexp.app.build import build_data, build_layout, build_logger, build_model_and_data
from tttexp.app.schemas import TrainConfig, fingerprint, option_of, register_configs, validate
from tttexp.app.security import check_config
from tttexp.app.table import print_summary
from tttexp.console import copy_console_to
from tttexp.errors import TTTExpError
from tttexp.loggers import catalogue as C
from tttexp.loggers.protocol import Resume
from tttexp.training import rundir
from tttexp.training.preemption import EXIT_PREEMPTED, Preempted, requeue_slurm_job
from tttexp.training.trainer import Trainer

register_configs()
log = logging.getLogger(__name__)


def main() -> None:
    """Entry point (app/entry.py): the rerun from YAML, preflight and the run directory's owner, then Hydra."""
    from tttexp.app import entry

    entry.main(entry.App("train", hydra_main, validate, claim=claim))


def claim(cfg: DictConfig, run_dir: Path) -> None:
    """The checkpoint rules of a run directory (training/rundir.py), decided before Hydra writes into it."""
    from tttexp.distributed import launch
    from tttexp.distributed.world import in_existing_world, world_from_env

    if in_existing_world():
        world = world_from_env()[1]
    elif launch.needs_launch(cfg, quiet=True):
        world = launch.resolve_nproc(cfg.distributed.nproc_per_node, quiet=True)
    else:
        world = 1
    rundir.check_claim(cfg.resume, run_dir, fingerprint(cfg, world_size=world), rows=cfg.data.batch_size * world)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    from tttexp.app import entry
    from tttexp.distributed import launch

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    copy_console_to(run_dir / f"{HydraConfig.get().job.name}.log")  # step lines, warnings, summary: in the log too
    try:
        check_config(HydraConfig.get(), "hydra")  # preflight checked it before Hydra built anything; again here
        job = preflight.checked(cfg, validate)  # preflight's, when it checked this very job; else built now
        _fill_logger_names(cfg, job)
        with entry.own(run_dir):
            if launch.needs_launch(cfg):
                return _launched(cfg, run_dir, job)
            return run(cfg, run_dir, job)
    except TTTExpError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        if _is_multirun():
            raise  # Hydra records the failed job; the other jobs (and an Optuna search) go on
        sys.exit(1)
    except Preempted as err:
        print(f"preempted: {err}", file=sys.stderr, flush=True)
        sys.exit(EXIT_PREEMPTED)
    except Exception as err:
        if type(err).__name__ == "ChildFailedError":
            recorded = run_dir / launch.WORKER_ERROR
            message = recorded.read_text().strip() if recorded.is_file() else (
                f"a worker failed, the job was stopped; see {run_dir}/train_rank*.log "
                f"({str(err).strip().splitlines()[0][:200]})")
            print(f"error: {message}", file=sys.stderr, flush=True)
            if _is_multirun():
                raise RuntimeError(message) from None
            sys.exit(1)
        raise


def _launched(cfg: DictConfig, run_dir: Path, job: TrainConfig) -> float | None:
    """Run the job in self-launched workers (each receives the built config); a preemption signal reaches them,
    they checkpoint, and the job ends as preempted (status 3), requeued where a scheduler can."""
    from tttexp.distributed import launch

    forwarder = launch.SignalForwarder(run_dir)
    result = launch.launch(cfg, run_dir, functools.partial(run_worker, job=job), forwarder=forwarder)
    if isinstance(result, dict) and "preempted" in result:
        message = result["preempted"]
        if forwarder.hand_over() or requeue_slurm_job():
            message = message.replace("run again with resume=auto to continue", "the job was requeued")
        raise Preempted(message)
    return result


def run_worker(cfg: DictConfig, run_dir: Path, job: TrainConfig) -> Any:
    """The job of a launched worker: :func:`run`, with a preemption returned to the launcher as a result."""
    try:
        return run(cfg, run_dir, job)
    except Preempted as err:
        return {"preempted": str(err)}


def run(cfg: DictConfig, run_dir: Path, job: TrainConfig | None = None) -> float | None:
    """Train one job into ``run_dir``; returns the final validation loss (the sweepers' objective). ``job``: the
    config :func:`validate` built from ``cfg`` (built here when not given); ``cfg`` itself is the run's record."""
    job = job if job is not None else validate(cfg)
    log.debug("the config that runs:\n%s", OmegaConf.to_yaml(cfg, resolve=True))  # hydra.verbose=tttexp
    layout = build_layout(job)
    device = layout.setup(job.device, job.seed)
    resume_key = fingerprint(job, world_size=layout.world_size)
    resume_state = rundir.resume_state(job.resume, run_dir, resume_key,
                                       rows=job.data.batch_size * layout.world_size)

    data = build_data(job.data)
    model, extra_facts = build_model_and_data(job, layout, data, resuming=resume_state is not None,
                                              resume_config=(resume_state or {}).get("model_config"))
    logger = build_logger(job, run_dir, layout.is_main)
    facts = {**_facts(job, model, layout, device), **extra_facts}
    resume = None if resume_state is None else Resume(int(resume_state["step"]), resume_state.get("wandb_run_id"))
    logger.start(run_dir, OmegaConf.to_container(cfg, resolve=True), facts, resume=resume)
    trainer = Trainer(
        model=model, data=data, layout=layout, logger=logger, optim=job.optim, loop=job.trainer,
        run_dir=run_dir, health=_health_monitor(), resume_state=resume_state, fingerprint=resume_key,
        passkey=job.passkey,
    )
    summary: dict[str, Any] = {}
    failed = True
    try:
        summary = trainer.fit()
        failed = False
    finally:  # a failed run's summary: its real time and throughput up to the failure
        logger.finish(summary or trainer.summary(), failed=failed)
        layout.teardown()
    if layout.is_main:
        print_summary(summary, run_dir)
    return summary.get(C.SUMMARY_FINAL_VAL_LOSS)


def _fill_logger_names(cfg: DictConfig, job: TrainConfig) -> None:
    """Default run name ``<model>-<layer>-<strategy>-<time>``; under ``-m`` the group is the sweep's folder. Set in
    both the record (``cfg``) and the built config the logger is made from."""
    names = {}
    if job.logging.run_name is None:
        stamp = time.strftime("%m%d-%H%M%S")
        base = getattr(job.model, "base_model", None)
        model = Path(str(base)).stem if base else job.model.name
        layer = job.model.ttt_layer if job.model.mixer == "ttt" else job.model.mixer
        names["run_name"] = f"{model}-{layer}-{job.strategy}-{stamp}"
    if job.logging.group is None and _is_multirun():
        sweep = Path(HydraConfig.get().sweep.dir)
        names["group"] = f"{sweep.parent.name}-{sweep.name}"
    for key, value in names.items():
        setattr(job.logging, key, value)
        cfg.logging[key] = value


def _is_multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def _health_monitor():
    from tttexp.loggers import HealthMonitor

    return HealthMonitor()


def _facts(cfg: TrainConfig, model, layout, device) -> dict[str, Any]:
    return {
        C.MODEL_TOTAL_PARAMETERS: sum(p.numel() for p in model.parameters()),
        C.MODEL_HIDDEN_SIZE: model.config.hidden_size,
        C.MODEL_NUM_LAYERS: model.config.num_hidden_layers,
        C.MODEL_TTT_LAYER: model.config.ttt_layer,
        C.MODEL_MIXER: cfg.model.mixer if cfg.model.mixer_types is None else ",".join(cfg.model.mixer_types),
        C.MODEL_BACKBONE: model.config.backbone,
        C.MODEL_KERNEL: model.resolved_kernel(device.type),
        C.MODEL_STATE_PASSING: bool(cfg.data.stream),
        C.MODEL_PRESET: cfg.model.name,
        "strategy": cfg.strategy,  # the recipe
        C.SYSTEM_DISTRIBUTED: option_of("distributed", cfg.distributed),  # the process layout
        C.TRAINER_PRECISION: layout.precision,
        C.TRAINER_COMPILE: layout.compile_label(model),  # auto resolved; "off" after a CPU fallback
        "world_size": layout.world_size,
        "device": str(device),
        "git_commit": _git_commit(),
        "seed": cfg.seed,
    }


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
