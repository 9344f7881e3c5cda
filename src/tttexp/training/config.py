"""The ``trainer`` group's settings: the loop's length and cadence, its numerics and what it checks.

A plain dataclass, Hydra-free: the app registers it as the group's schema and builds it from the composed values
once per job (its checks run then); the trainer receives the object. The optimizer's settings live beside the
optimizer (training/optimizer.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tttexp.configs import RESUME, choice, positive
from tttexp.errors import ConfigError


@dataclass
class TrainerConfig:
    """The loop: its length and cadence, its numerics, and what it checks."""

    max_steps: int = 200  # optimizer steps
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    log_every: int = 10  # steps between metric records
    eval_every: int = 50  # steps between validation passes (and one at the end); 0 disables
    ckpt_every: int = 0  # steps between checkpoints (and one at the end); 0: only at the end
    keep_last: int = 2  # checkpoints kept in the run directory
    progress: str = "auto"  # auto (a bar on a terminal, plain lines otherwise) | bar | lines | none
    # fp32 | bf16 (autocast; the TTT state and LayerNorm statistics stay fp32)
    precision: str = field(default="fp32", metadata=RESUME)
    # torch.compile: false | true (the whole model; per block under FSDP) | blocks (each block, one shared graph) |
    # auto (blocks for models of 300M parameters and up, the whole model below); off on the CPU
    compile: Any = False
    tf32: bool = False  # allow TF32 matmuls on CUDA
    deterministic: bool = False  # torch deterministic algorithms where they exist
    on_cpu: str = "fallback"  # without a GPU, bf16/compile: fallback (fp32, eager, one warning) | error
    skip_nonfinite: bool = False  # skip steps whose loss or gradients are not finite (costs a host sync a step)
    max_bad_steps: int = 5  # with skip_nonfinite: stop after this many bad steps in a row
    # check on the device, after each step, that every training batch is what the loader produced (labels aligned
    # with inputs, a checksum carried from the host); a changed batch stops the run at the next record
    check_batches: bool = False
    # with data.stream: restart a row's TTT state where a document starts
    reset_on_document: bool = field(default=True, metadata=RESUME)
    inference_every: int = 0  # steps between inference timings (prefill + decode); 0 disables
    position_eval_len: int = 0  # tokens per sequence of the loss-by-position evaluation; 0: 4 x data.seq_len
    position_eval_sequences: int = 8  # validation sequences in it; 0 disables it
    plots: bool = True  # loss.png and ppl_by_position.png in the run directory at the end

    def __post_init__(self) -> None:
        positive("trainer.max_steps", self.max_steps)
        positive("trainer.grad_accum_steps", self.grad_accum_steps)
        positive("trainer.log_every", self.log_every)
        for key in ("eval_every", "ckpt_every", "keep_last"):
            positive(f"trainer.{key}", getattr(self, key), allow_zero=True)
        choice("trainer.progress", self.progress, ("auto", "bar", "lines", "none"))
        choice("trainer.precision", self.precision, ("fp32", "bf16"))
        choice("trainer.on_cpu", self.on_cpu, ("fallback", "error"))
        positive("trainer.max_bad_steps", self.max_bad_steps)
        positive("trainer.inference_every", self.inference_every, allow_zero=True)
        if not (isinstance(self.compile, bool) or self.compile in ("blocks", "auto")):
            raise ConfigError(f"trainer.compile={self.compile}: expected a boolean (true or false), blocks or auto")
