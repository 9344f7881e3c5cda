"""Strategy: the process/device layer — device, numeric flags, model wrapping (compile, DDP) and collectives."""

from __future__ import annotations

import contextlib
import os
import random
import sys
from typing import Any

import torch
from torch import nn

from tttexp.distributed.world import process_rank
from tttexp.errors import StrategyError


def warn(message: str) -> None:
    """One line on stderr, from rank 0 only."""
    if process_rank() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


class Strategy:
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
        **_unused: Any,
    ) -> None:
        self.precision = precision
        self.compile = compile
        self.tf32 = tf32
        self.deterministic = deterministic
        self.on_cpu = on_cpu
        self.label = label
        self.device = torch.device("cpu")
        self.rank, self.world_size, self.local_rank = 0, 1, 0

    # --- lifecycle ---------------------------------------------------------------------------------------------

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def setup(self, device: str, seed: int) -> torch.device:
        """Pick the device, set the numeric flags and seed every generator (offset by rank)."""
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
        seed_everything(seed + self.rank)
        return self.device

    def _pick_device(self, device: str) -> torch.device:
        if device == "cuda" and not torch.cuda.is_available():
            raise StrategyError("device=cuda but no CUDA GPU is visible; use device=auto or device=cpu")
        if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
            return torch.device("cpu")
        return torch.device("cuda", self.local_rank)

    def _cpu_fallback(self) -> None:
        """Settings that only make sense on a GPU are switched off on the CPU."""
        if self.precision == "bf16" or self.compile:
            if self.on_cpu == "error":
                raise StrategyError(
                    f"{self.label} asks for trainer.precision={self.precision} trainer.compile={self.compile} and no "
                    "CUDA GPU is visible; use strategy=conservative, or trainer.on_cpu=fallback to run fp32/eager"
                )
            warn(f"{self.label}: no CUDA GPU; running the CPU equivalent (trainer.precision=fp32, "
                 "trainer.compile=false, torch kernels)")
            self.precision, self.compile = "fp32", False

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Move to the device; compile if asked. Returns the module to call in the loop."""
        model.to(self.device)
        if self.compile:
            return torch.compile(model)
        return model

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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
