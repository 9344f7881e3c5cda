"""ProcessLayout: the process/device layer — device, numeric flags, model wrapping (compile, DDP) and collectives."""

from __future__ import annotations

import contextlib
import os
import random
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tttexp.configs import choice
from tttexp.distributed.world import process_rank
from tttexp.errors import ConfigError, LayoutError


@dataclass
class LayoutConfig:
    """What every option of the ``distributed`` group takes (``conf/distributed/*.yaml``); each option's own
    dataclass (``SingleDeviceConfig``, ``DDPConfig``, ``FSDPConfig``) adds the keys its class reads."""

    _target_: str  # the class built: tttexp.distributed.SingleDevice | DistributedDataParallel | ...
    nproc_per_node: Any = 1  # processes on this machine: an int or "auto" (one per GPU); DDP/FSDP self-launch
    checkpoint: str = "auto"  # auto (dcp under FSDP, pt otherwise) | dcp (sharded directory) | pt (one file)
    async_checkpoint: bool = False  # dcp: write shards in the background; marked complete when written

    def __post_init__(self) -> None:
        nproc = self.nproc_per_node
        if not (nproc == "auto" or (isinstance(nproc, int) and not isinstance(nproc, bool) and nproc > 0)):
            raise ConfigError(f"distributed.nproc_per_node={nproc!r} must be a positive integer or 'auto'")
        choice("distributed.checkpoint", self.checkpoint, ("auto", "dcp", "pt"))


def warn(message: str) -> None:
    """One line on stderr, from rank 0 only."""
    if process_rank() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


class ProcessLayout:
    """The process/device layer: picks the device, sets the numeric flags, wraps the model, runs collectives.

    The app instantiates a subclass from ``conf/distributed`` and passes the numerics it owns from ``trainer``
    (precision, compile, tf32, deterministic, on_cpu). After :meth:`setup`, ``precision`` and ``compile`` hold what
    actually runs (the CPU fallback switches bf16 and compile off).
    """

    def __init__(
        self,
        precision: str = "fp32",
        compile: bool = False,
        tf32: bool = False,
        deterministic: bool = False,
        on_cpu: str = "fallback",
        label: str = "this run",
        checkpoint: str = "auto",
        async_checkpoint: bool = False,
        context_parallel: int = 1,
        **_unused: Any,
    ) -> None:
        self.precision = precision
        self.compile = compile
        # checkpoint format: "pt" (one file, written by rank 0) | "dcp" (sharded directory); auto: the layer's own
        self.checkpoint_format = self.default_checkpoint_format if checkpoint == "auto" else checkpoint
        self.async_checkpoint = bool(async_checkpoint)
        self.seed = 0
        self.tf32 = tf32
        self.deterministic = deterministic
        self.on_cpu = on_cpu
        self.label = label
        self.device = torch.device("cpu")
        self.rank, self.world_size, self.local_rank = 0, 1, 0
        self.context_parallel = int(context_parallel)
        self.context = None  # distributed.context.ContextParallel when context_parallel > 1 (DDP, FSDP)

    # --- lifecycle ---------------------------------------------------------------------------------------------

    default_checkpoint_format = "pt"
    shards_parameters = False  # True when every process must take part in each forward pass (FSDP)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def setup(self, device: str, seed: int) -> torch.device:
        """Pick the device, set the numeric flags and seed every generator (offset by rank)."""
        if self.context_parallel != 1 and type(self).__name__ == "SingleDevice":
            raise LayoutError("distributed.context_parallel needs distributed=ddp or distributed=fsdp")
        self.device = self._pick_device(device)
        if self.device.type == "cpu":
            self._cpu_fallback()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = self.tf32
            torch.backends.cudnn.allow_tf32 = self.tf32
        if self.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.seed = seed
        seed_everything(seed + self.rank)
        return self.device

    def _pick_device(self, device: str) -> torch.device:
        if device == "cuda" and not torch.cuda.is_available():
            raise LayoutError("device=cuda but no CUDA GPU is visible; use device=auto or device=cpu")
        if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
            return torch.device("cpu")
        return torch.device("cuda", self.local_rank)

    def _cpu_fallback(self) -> None:
        """Settings that only make sense on a GPU are switched off on the CPU."""
        if self.precision == "bf16" or self.compile:
            if self.on_cpu == "error":
                raise LayoutError(
                    f"{self.label} needs a CUDA GPU (trainer.precision={self.precision}, trainer.compile="
                    f"{str(self.compile).lower()}) and none is visible; use strategy=conservative, or "
                    "trainer.on_cpu=fallback to run fp32/eager on the CPU"
                )
            warn(f"{self.label}: no CUDA GPU; running the CPU equivalent (trainer.precision=fp32, "
                 "trainer.compile=false, torch kernels)")
            self.precision, self.compile = "fp32", False

    @property
    def data_rank(self) -> int:
        """This process's index among those that read different sequences (all ranks of a context group share
        one)."""
        return self.rank // self.context_parallel

    @property
    def data_world_size(self) -> int:
        return self.world_size // self.context_parallel

    def local_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The part of a batch this process computes: all of it, or its slice of each sequence under context
        parallelism."""
        return batch if self.context is None else self.context.local_batch(batch)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Move to the device; compile if asked. Returns the module to call in the loop."""
        model.to(self.device)
        if self.compile_mode(model) == "blocks":
            compile_blocks(model)
        elif self.compile:
            return torch.compile(model)
        return model

    def compile_mode(self, model: nn.Module) -> str | None:
        """``trainer.compile`` resolved for this model and records it in ``self.compile``: None | "model" |
        "blocks". ``auto`` compiles each block on its own for models of at least ``BLOCKS_FROM`` parameters (one
        graph shared by every block: minutes less compile time at 350m and up) and the whole model below that."""
        mode = self.compile
        if mode == "auto":
            mode = "blocks" if sum(p.numel() for p in model.parameters()) >= BLOCKS_FROM else True
        self.compile = mode
        return None if not mode else "blocks" if mode == "blocks" else "model"

    def compile_label(self, model: nn.Module) -> str:
        """What ``prepare_model`` will compile, as logged: "off" | "model" | "blocks" (``auto`` resolved)."""
        return self.compile_mode(model) or "off"

    def grad_norm(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """The global gradient norm (a plain tensor on this device), clipping to ``max_norm`` when it is > 0."""
        if max_norm and max_norm > 0:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        return torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params]))

    def local_tensors(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The part of each tensor this process holds (all of it here; its shard under FSDP)."""
        return tensors

    # --- checkpoint state (the whole model on every process, except where a subclass shards it) ----------------

    def full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        """The model's and the optimizer's state as one process holds them (torch's own formats)."""
        return model.state_dict(), optimizer.state_dict()

    def load_full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                        optimizer_state: dict) -> None:
        """Load what :meth:`full_state` returned (from a ``.pt`` checkpoint)."""
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def no_sync(self, model: nn.Module, last_micro_batch: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce on all but the last micro-batch (DDP); a no-op on one device."""
        return contextlib.nullcontext()

    # --- collectives (identity on one process) -------------------------------------------------------------------

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def all_reduce_max(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def gather_object(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order (a list of one here)."""
        return [obj]

    def barrier(self) -> None:
        pass

    def teardown(self) -> None:
        pass


BLOCKS_FROM = 300_000_000  # trainer.compile=auto: per-block compile from this many parameters (the 350m preset up)


def compile_blocks(model: nn.Module) -> None:
    """Compile each block in place (``nn.Module.compile``): the blocks share one graph; the head stays eager."""
    for block in model.blocks():
        block.compile()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
