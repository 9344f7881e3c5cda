"""The checkpoint manager: save, restore and pruning of a run's checkpoints, in either format.

The trainer owns the step; this owns what a checkpoint holds besides the loop's own counters: the weights and the
optimizer (whole, or DCP shards), each rank's data position, RNG streams and carried state, the fingerprint a resume
must match (training/rundir.py) and the wandb run id that hands the run's ownership to a resume. It also keeps the
run's tokenizer beside the checkpoints, so that an export is a complete model.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from tttexp.distributed import ProcessLayout
from tttexp.training import checkpoint as ckpt
from tttexp.training import dcp, reshard, rundir

WANDB_RUN_ID_FILE = "wandb_run_id"


class CheckpointManager:
    """Writes and reads the checkpoints of one run directory for one model, optimizer and loader."""

    def __init__(self, *, run_dir: Path, layout: ProcessLayout, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, loader: Any, keep_last: int,
                 fingerprint: dict[str, Any] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.layout = layout
        self.model = model
        self.optimizer = optimizer
        self.loader = loader
        self.keep_last = keep_last
        self.fingerprint = fingerprint  # the config values a resume must match (training/rundir.py)
        self.checkpointer = dcp.ShardedCheckpointer(layout, async_save=layout.async_checkpoint)

    # ---------------------------------------------------------------------------------------------------- saving

    def state_dict(self, loop: Mapping[str, Any], weights: bool = True) -> dict[str, Any]:
        """The whole checkpoint (``weights=False``: all but the model and optimizer, which a sharded checkpoint
        writes itself). ``loop``: the trainer's step, tokens_seen, carry, counters, token_hash and history."""
        carry = loop["carry"]
        ranks = self.layout.gather_object({  # what differs between processes
            "data": self.loader.state_dict(),
            "rng": ckpt.rng_state(),
            "carry": carry.state_dict() if carry is not None else None,
        })
        run_id_file = self.run_dir / WANDB_RUN_ID_FILE
        model, optimizer = self.layout.full_state(self.model, self.optimizer) if weights else (None, None)
        return {
            "step": loop["step"],
            "tokens_seen": loop["tokens_seen"],
            "world_size": self.layout.world_size,
            "context_parallel": self.layout.context_parallel,  # ranks per sequence: each holds H / cp heads' state
            "global_rows": self.loader.batch_size * self.layout.data_world_size,  # for resharding
            "model_config": self.model.config.to_dict(),  # export rebuilds the model from it
            **({"model": model, "optimizer": optimizer} if weights else {}),
            "ranks": ranks,
            "counters": loop["counters"],
            "token_hash": loop["token_hash"],
            "fingerprint": self.fingerprint,
            "history": loop["history"],
            "wandb_run_id": run_id_file.read_text().strip() if run_id_file.exists() else None,
        }

    def save(self, loop: Mapping[str, Any], final: bool) -> Path | None:
        """Every rank takes part (its state is gathered); rank 0 writes; all wait for the file. ``final``: the
        last save of this process (an asynchronous sharded save is waited for)."""
        step = int(loop["step"])
        if self.layout.checkpoint_format == "dcp":
            path = ckpt.checkpoint_path(self.run_dir, step).with_suffix(dcp.SUFFIX)
            path = self.checkpointer.save(path, self.model, self.optimizer, self.state_dict(loop, weights=False),
                                          self.keep_last,
                                          prune=lambda keep: ckpt.prune_checkpoints(self.run_dir, step, keep))
            if final:
                self.checkpointer.wait()
            return path
        state = self.state_dict(loop)
        path = None
        if self.layout.is_main:
            path = ckpt.save_checkpoint(self.run_dir, step, state, keep_last=self.keep_last)
        self.layout.barrier()
        return path

    def weights_finite(self) -> bool:
        """Are all weights and optimizer moments finite, on every process? One host sync."""
        tensors = [p.detach() for p in self.model.parameters()]
        tensors += [v for state in self.optimizer.state.values() for v in state.values()
                    if torch.is_tensor(v) and v.is_floating_point()]
        tensors = self.layout.local_tensors(tensors)  # this process's shards under FSDP
        bad = (~torch.stack([torch.isfinite(t).all() for t in tensors]).all()).float()
        if self.layout.world_size > 1:
            bad = self.layout.all_reduce_max(bad)
        return not bool(bad > 0)

    def latest(self) -> Path | None:
        found = ckpt.list_checkpoints(self.run_dir)
        return found[0] if found else None

    def save_tokenizer(self, tokenizer: Any) -> None:
        """Keep the run's tokenizer in its directory (rank 0, once), so that an export is a complete model."""
        target = self.run_dir / rundir.TOKENIZER_DIR
        if not self.layout.is_main or tokenizer is None or target.exists():
            return
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            if tokenizer.save_pretrained(tmp):
                os.replace(tmp, target)
        except Exception as err:  # noqa: BLE001 - a tokenizer that cannot be saved must not stop training
            print(f"warning: the tokenizer was not kept in {target} ({type(err).__name__}: "
                  f"{str(err).splitlines()[0][:120] if str(err) else ''}); an export will hold the model only",
                  file=sys.stderr, flush=True)

    # ------------------------------------------------------------------------------------------------- restoring

    def restore(self, state: dict[str, Any], stream: bool,
                load_carry: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
        """Load a checkpoint of any format written at any world size (training/reshard.py has the rule) into the
        model, optimizer, loader and RNG streams. Returns the loop's part: step, tokens_seen, carry (built by
        ``load_carry`` from its state, or None), counters, history and token_hash."""
        if state.get("format") == "dcp":
            dcp.load_into(Path(state["path"]), self.model, self.optimizer, state)
        else:
            if self.layout.shards_parameters:
                dcp.check_fits("the checkpoint", {k: tuple(v.shape) for k, v in state["model"].items()},
                               self.model, state.get("model_config"))
            try:
                self.layout.load_full_state(self.model, self.optimizer, state["model"], state["optimizer"])
            except RuntimeError as err:
                raise ckpt.CheckpointError(f"the checkpoint's model does not fit this one: "
                                           f"{ckpt.shape_mismatches(err)}; resume with the model settings it was "
                                           "written with") from None
        loader = self.loader
        mine = reshard.rank_state(state, self.layout.rank, self.layout.world_size, rows_per_rank=loader.batch_size,
                                  stream=stream, batches_per_epoch=getattr(loader, "batches_per_epoch", None),
                                  context_parallel=self.layout.context_parallel)
        loader.load_state_dict(mine["data"])
        if mine["rng"] is not None:
            ckpt.restore_rng_state(mine["rng"])
        else:
            reshard.reseed(self.layout.seed, int(state["step"]), self.layout.rank)
        return {
            "step": int(state["step"]),
            "tokens_seen": int(state["tokens_seen"]),
            "carry": load_carry(mine["carry"]) if mine.get("carry") is not None else None,
            "counters": state.get("counters", {}),
            "history": state.get("history", []),
            "token_hash": state.get("token_hash"),
        }
