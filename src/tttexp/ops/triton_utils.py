"""Pieces shared by the Triton TTT kernels: dots in the input dtype, row LayerNorm forward/backward with padding,
gelu_tanh and its derivatives, and the launch settings' text form that crosses the ``torch.library`` op boundary.

Head dims that are not a power of two (96) run padded to the next one (128); every row statistic divides by the
true ``F`` and every LayerNorm output is zeroed in the padded columns, so padded columns stay exactly zero.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import TypeVar

import torch
import triton
import triton.language as tl

EPS = tl.constexpr(1e-6)


C = TypeVar("C")


def config_to_str(config: object, default: object) -> str:
    """The launch settings as the custom ops take them: ``""`` for the defaults, else JSON of every field."""
    return "" if config == default else json.dumps(dataclasses.asdict(config), sort_keys=True)


def config_from_str(cls: type[C], text: str) -> C:
    """Inverse of :func:`config_to_str`."""
    return cls(**json.loads(text)) if text else cls()


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def dot_config(dtype: torch.dtype, lowp: str = "input") -> tuple[object, str, bool]:
    """``(DT, PREC, EMU)`` for the kernels: operand dtype, fp32 dot precision, and whether to emulate bf16 dots.

    fp32 inputs use "ieee" dots (tf32 would cost ~1e-3 relative error). bf16/fp16 inputs use dots in the input
    dtype (``lowp="input"``) or tf32 dots on fp32 operands (``lowp="tf32"``: 8x finer operand rounding, slower).
    Under the interpreter, bf16/fp16 dots are not computed correctly, so there the operands are rounded to the
    input dtype and multiplied in fp32, which is what the tensor cores do up to the order of accumulation.
    """
    if dtype == torch.float32:
        return tl.float32, "ieee", False
    if lowp == "tf32":
        return tl.float32, "tf32", False
    dt = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]
    return dt, "default", interpreted()


def padded_dim(f: int) -> int:
    """The head dim the kernels work in: the next power of two, at least 16 (the smallest dot)."""
    return max(16, triton.next_power_of_2(f))


@triton.jit
def mm(a, b, DT: tl.constexpr, PREC: tl.constexpr, EMU: tl.constexpr):
    """``a @ b`` with operands in ``DT`` and fp32 accumulation."""
    if EMU:
        r = tl.dot(a.to(DT).to(tl.float32), b.to(DT).to(tl.float32), input_precision="ieee")
    elif PREC == "default":
        r = tl.dot(a.to(DT), b.to(DT))
    else:
        r = tl.dot(a.to(DT), b.to(DT), input_precision=PREC)
    return r


@triton.jit
def ln_rows(z, cmask, F: tl.constexpr):
    """Normalised rows of ``z`` (zero in padded columns) and their ``rstd``; padded columns of ``z`` must be 0."""
    mu = tl.sum(z, 1) / F
    xc = tl.where(cmask[None, :], z - mu[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, 1) / F + EPS)
    return xc * rstd[:, None], rstd


@triton.jit
def ln_rows_bwd(dxh, xh, rstd, cmask, F: tl.constexpr):
    """Gradient wrt ``z`` through ``xh = (z - mean z) * rstd(z)``; ``dxh`` must be 0 in padded columns."""
    a = tl.sum(dxh, 1) / F
    c = tl.sum(dxh * xh, 1) / F
    return tl.where(cmask[None, :], rstd[:, None] * (dxh - a[:, None] - xh * c[:, None]), 0.0)


@triton.jit
def tanh(u):
    """tanh from one exp."""
    return 2.0 / (1.0 + tl.exp(-2.0 * u)) - 1.0


@triton.jit
def gelu(x):
    """gelu_tanh."""
    return 0.5 * x * (1.0 + tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))


@triton.jit
def gelu_grad(x):
    """d gelu_tanh / dx."""
    t = tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)


@triton.jit
def gelu_parts(x):
    """gelu_tanh(x) and its first and second derivatives."""
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)
    ddu = 6.0 * 0.044715 * 0.7978845608028654 * x
    t = tanh(u)
    sech2 = 1.0 - t * t
    return (0.5 * x * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * x * sech2 * du,
            sech2 * (du + 0.5 * x * (ddu - 2.0 * t * du * du)))
