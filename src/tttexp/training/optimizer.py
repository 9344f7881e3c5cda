"""The optimizer the trainer steps: AdamW over two groups (matrices decayed; vectors and norms not), and its
settings (the ``optim`` group)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tttexp.configs import RESUME, float32, positive
from tttexp.errors import ConfigError


@dataclass
class OptimConfig:
    """The ``optim`` group: AdamW with linear warmup and cosine decay to a floor (the paper's settings by default).
    Every field decides the math, so a resume must match all of them."""

    # peak learning rate, as used (recipes set it here; nothing scales it later)
    lr: float = field(default=3e-3, metadata=RESUME)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95], metadata=RESUME)  # AdamW betas
    weight_decay: float = field(default=0.1, metadata=RESUME)  # on matrices only; vectors and norms are not decayed
    eps: float = field(default=1e-8, metadata=RESUME)  # AdamW epsilon
    warmup_steps: int = field(default=20, metadata=RESUME)  # linear warmup steps (also TTT-MLP's inner-LR ramp)
    min_lr_ratio: float = field(default=0.1, metadata=RESUME)  # the cosine ends at lr * min_lr_ratio
    max_grad_norm: float = field(default=1.0, metadata=RESUME)  # clip the global gradient norm; 0 disables

    def __post_init__(self) -> None:
        positive("optim.lr", self.lr)
        for key in ("lr", "weight_decay", "eps"):
            float32(f"optim.{key}", getattr(self, key))
        positive("optim.weight_decay", self.weight_decay, allow_zero=True)
        positive("optim.warmup_steps", self.warmup_steps, allow_zero=True)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio={self.min_lr_ratio} must be between 0 and 1")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas={list(self.betas)} must be two numbers in [0, 1)")


def build_optimizer(model: torch.nn.Module, optim: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """Fused on CUDA (it can skip a non-finite step on the device, see the trainer)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, **extra)
