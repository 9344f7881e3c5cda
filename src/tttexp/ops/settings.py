"""Launch settings of the Triton kernels, one frozen dataclass per TTT layer.

They live apart from the kernels so that the model can check ``model.kernel_settings`` (a mapping of these fields)
where Triton is not installed, and so that a misspelt or mistyped setting fails when the config is read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

LOWP = ("input", "tf32")  # the dots for bf16/fp16 inputs: in the input dtype, or tf32 on fp32 operands


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} is one of {', '.join(repr(a) for a in allowed)}, got {value!r}")


@dataclass(frozen=True)
class LinearConfig:
    """Launch settings of the TTT-Linear kernels; the defaults are the measured best on an H100
    (benchmarks/NOTES-kernels.md).

    ``every``: mini-batches per checkpoint segment. Warps left at None: 4 for head dims up to 64, 8 above, for the
    forward (``fwd_warps``), the backward's segment passes (``bwd_warps``) and its reverse chain (``chain_warps``).
    Stages None: Triton's default, except the fp32 backward at head dim 128 (the pipelined buffers need more shared
    memory than the chip has). ``lowp``: the dots used for bf16 inputs ("input": bf16 operands, "tf32": fp32
    operands in tf32). ``split_fwd`` None: split the training forward (state chain, then segment outputs) only when
    batch x heads fills under a third of the SMs; below that the chain's shorter steps win, above it the extra
    output pass costs more. ``scratch``: the dtype of the backward's per-step tiles that feed dots (``Lg``,
    ``dZbar`` and the chain's ``p``, ``q``): "input" (bf16/fp16 inputs keep them in their own dtype, half the
    bytes; the normalised prediction, ``dLg`` and the row statistics stay fp32; the chain pass 291 -> 207 us at
    8x2048x12x64 on an H100), or "fp32". ``reuse``: the finishing segment pass reads the first pass's stored
    ``Xh``, ``rstd``, ``c``, ``dZbar`` and local ``dLg`` instead of recomputing them (four dots and three row
    normalisations a step fewer, three more tiles read), and the first pass sums the post-norm's own gradient
    (the segment passes 437 -> 416 us at 8x2048x12x64 on an H100).
    """

    every: int = 8
    fwd_warps: int | None = None
    bwd_warps: int | None = None
    chain_warps: int | None = None
    fwd_stages: int | None = None
    bwd_stages: int | None = None
    lowp: str = "input"
    split_fwd: bool | None = None
    scratch: str = "input"
    reuse: bool = False

    def __post_init__(self) -> None:
        _one_of("lowp", self.lowp, LOWP)
        _one_of("scratch", self.scratch, ("fp32", "input"))



@dataclass(frozen=True)
class MLPConfig:
    """Launch settings of the TTT-MLP kernels: hidden-dim chunk ``hc``, mini-batches per checkpoint segment
    ``every``, warps of the forward (``warps``) and backward (``bwd_warps``), stages (None: Triton's default) and the
    dots used for bf16 inputs (``lowp``, as for TTT-Linear). Chunks of 32 keep the sm_90 build's spills small
    (see benchmarks/NOTES-kernels.md). ``split_bwd``: the backward as a parallel output path and a shorter serial
    chain (:mod:`tttexp.ops.ttt_mlp.split`), its parallel kernel at ``local_warps`` (None: ``bwd_warps``).
    ``split_fwd``: the training forward as the state chain alone (with its checkpoints), then every checkpoint
    segment's outputs in parallel. Both are off until they are timed on a GPU."""

    hc: int = 32
    every: int = 8
    warps: int = 8
    bwd_warps: int = 8
    fwd_stages: int | None = None
    bwd_stages: int | None = None
    lowp: str = "input"
    split_bwd: bool = False
    local_warps: int | None = None
    split_fwd: bool = False

    def __post_init__(self) -> None:
        _one_of("lowp", self.lowp, LOWP)



SETTINGS: dict[str, type] = {"linear": LinearConfig, "mlp": MLPConfig}
_LAYER_NAMES = {"linear": "TTT-Linear", "mlp": "TTT-MLP"}
_TYPES = {"int": int, "bool": bool, "str": str, "None": type(None)}


def _type_ok(value: Any, annotation: str) -> bool:
    """Whether ``value`` fits a field annotated ``annotation`` (``int``, ``bool | None``, ...); bools are no ints."""
    kinds = [_TYPES[part.strip()] for part in annotation.split("|")]
    if isinstance(value, bool):
        return bool in kinds
    return any(isinstance(value, kind) for kind in kinds)


def kernel_settings(layer: str, values: Mapping[str, Any] | None) -> LinearConfig | MLPConfig | None:
    """The launch settings of ``layer``'s kernels with ``values`` over the defaults; None when ``values`` is empty
    (the kernels' own defaults). Raises ``ValueError`` with one line that names the setting to change."""
    if not values:
        return None
    cls = SETTINGS[layer]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in fields:
            raise ValueError(f"model.kernel_settings.{key}: the {_LAYER_NAMES[layer]} kernels have no such setting; "
                             f"they have {', '.join(fields)}")
        if not _type_ok(value, str(fields[key].type)):
            raise ValueError(f"model.kernel_settings.{key}={value!r}: expected {fields[key].type}")
    try:
        return cls(**values)
    except ValueError as err:
        raise ValueError(f"model.kernel_settings: {err}") from None
