"""Strategy: where and how a model trains — device, precision, kernels, compile, wrapping and collectives."""

from __future__ import annotations

import contextlib
import os
import random
import sys
from typing import Any

import torch
from torch import nn

from tttexp.errors import StrategyError


def warn(message: str) -> None:
    """One line on stderr, from rank 0 only."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


class Strategy:
    """A training recipe's process-level settings; the app instantiates a subclass from ``conf/strategy``.

    Fields mirror :class:`tttexp.config.StrategyBase`; recipe-specific extras (``base_model``, ``on_cpu``, ...)
    stay in ``self.options``.
    """

    def __init__(
        self,
        name: str,
        precision: str = "fp32",
        compile: bool = False,
        tf32: bool = False,
        deterministic: bool = False,
        lr_scale: float = 1.0,
        max_grad_norm: float | None = None,
        state_passing: bool = False,
        reset_on_document: bool = True,
        skip_nonfinite: bool = False,
        max_bad_steps: int = 5,
        inference_every: int = 0,
        prefetch: bool = False,
        kernel: str | None = None,
        **options: Any,
    ) -> None:
        self.name = name
        self.precision = precision
        self.compile = compile
        self.tf32 = tf32
        self.deterministic = deterministic
        self.lr_scale = lr_scale
        self.max_grad_norm = max_grad_norm
        self.state_passing = state_passing
        self.reset_on_document = reset_on_document
        self.skip_nonfinite = skip_nonfinite
        self.max_bad_steps = max_bad_steps
        self.inference_every = inference_every
        self.prefetch = prefetch
        self.kernel = kernel
        self.options = options
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
            if self.options.get("on_cpu", "fallback") == "error":
                raise StrategyError(
                    f"strategy={self.name} needs a CUDA GPU and none is visible; "
                    "use strategy=conservative, or strategy.on_cpu=fallback to run fp32/eager on the CPU"
                )
            warn(f"strategy={self.name}: no CUDA GPU; running the CPU equivalent (fp32, eager, torch kernels)")
            self.precision, self.compile, self.prefetch = "fp32", False, False

    def kernel_for(self, requested: str) -> str:
        """The inner-loop kernel this recipe uses: its pinned one (``strategy.kernel``), else ``model.kernel``."""
        return self.kernel or requested

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
