"""The training group's settings: the optimizer (``optim``) and the loop (``trainer``).

Plain dataclasses, Hydra-free: the app registers them as the schema of their config groups and builds the trainer's
objects of the same classes from the composed values (``OptimConfig(**values)``), so each default is written once,
here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay to a floor (the paper's settings by default)."""

    lr: float = 3e-3  # peak learning rate, as used (recipes set it here; nothing scales it later)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW betas
    weight_decay: float = 0.1  # on matrices only; vectors and norms are not decayed
    eps: float = 1e-8  # AdamW epsilon
    warmup_steps: int = 20  # linear warmup steps (also TTT-MLP's inner-LR ramp)
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    max_grad_norm: float = 1.0  # clip the global gradient norm; 0 disables


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
    precision: str = "fp32"  # fp32 | bf16 (autocast; the TTT state and LayerNorm statistics stay fp32)
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
    reset_on_document: bool = True  # with data.stream: restart a row's TTT state where a document starts
    inference_every: int = 0  # steps between inference timings (prefill + decode); 0 disables
    position_eval_len: int = 0  # tokens per sequence of the loss-by-position evaluation; 0: 4 x data.seq_len
    position_eval_sequences: int = 8  # validation sequences in it; 0 disables it
    plots: bool = True  # loss.png and ppl_by_position.png in the run directory at the end
