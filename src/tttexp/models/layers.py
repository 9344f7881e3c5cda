"""Building blocks shared by the TTT blocks: RMSNorm, SwiGLU, RoPE and a causal depthwise conv with carried state."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.to(torch.promote_types(dtype, torch.float32))
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rotary_tables(positions: Tensor, dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin ``[T, dim]`` of rotate-half RoPE at integer ``positions [T]``."""
    dt = torch.promote_types(dtype, torch.float32)
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=dt) / dim))
    angles = positions.to(dt)[:, None] * inv_freq[None, :]
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@torch.library.custom_op("tttexp::rotary_tables", mutates_args=())
def rotary_tables_op(positions: Tensor, dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """:func:`rotary_tables` as one opaque node. Compiled, the plain form is fused into the kernel that applies
    it, which then takes a pow, a sin and a cos per element of q and k instead of per position and feature."""
    return rotary_tables(positions, dim, theta, dtype)


@rotary_tables_op.register_fake
def _rotary_tables_fake(positions, dim, theta, dtype):
    table = positions.new_empty((positions.shape[0], dim), dtype=dtype)
    return table, torch.empty_like(table)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    f = x.shape[-1]
    x1, x2 = x[..., : f // 2], x[..., f // 2 :]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def rotary(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Rotate-half RoPE on ``x [B, H, T, F]`` at integer ``positions [T]`` (the caller takes them modulo K)."""
    cos, sin = rotary_tables(positions, x.shape[-1], theta, x.dtype)
    return apply_rotary(x, cos, sin)


def document_mask(starts: Tensor, width: int) -> Tensor:
    """For each token and each look-back ``k < width``: may token t read token t-k of its sequence?

    ``starts [B, T]`` marks tokens that begin a document; a token never reads across the start of its document
    (earlier chunks count as before position 0). Returns ``[B, T, width]`` bool.
    """
    _, seq = starts.shape
    pos = torch.arange(seq, device=starts.device)
    last_start = torch.where(starts, pos, torch.full_like(pos, -seq - width)).cummax(dim=1).values
    lag = torch.arange(width, device=starts.device)
    return (pos[None, :, None] - lag[None, None, :]) >= last_start[:, :, None]


class CausalConv(nn.Module):
    """Depthwise causal conv over time with ``width`` taps; it carries its last ``width-1`` inputs between calls."""

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.width = width
        self.weight = nn.Parameter(torch.empty(channels, 1, width))
        self.bias = nn.Parameter(torch.empty(channels))
        bound = 1.0 / width**0.5
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor, tail: Tensor | None = None, starts: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``x [B, T, C]``, ``tail [B, width-1, C]`` (the previous inputs, zeros when absent), ``starts [B, T]``.

        Returns the output ``[B, T, C]`` and the new tail.
        """
        bsz, seq, ch = x.shape
        if tail is None:
            tail = x.new_zeros(bsz, self.width - 1, ch)
        xp = torch.cat([tail.to(x.dtype), x], dim=1)
        if starts is None and not x.is_cuda:
            y = F.conv1d(xp.transpose(1, 2), self.weight.to(x.dtype), self.bias.to(x.dtype), groups=ch)
            y = y.transpose(1, 2)
        else:
            # A sum of shifted copies: exact, and under torch.compile it fuses into one elementwise kernel
            # (depthwise conv1d goes to a separate, slower library kernel on the GPU).
            allowed = None if starts is None else document_mask(starts, self.width).to(x.dtype)
            y = self.bias.to(x.dtype).expand(bsz, seq, ch)
            for lag in range(self.width):
                shifted = xp[:, self.width - 1 - lag : self.width - 1 - lag + seq]
                term = shifted * self.weight[:, 0, self.width - 1 - lag].to(x.dtype)
                y = y + (term if allowed is None else term * allowed[..., lag, None])
        return y, xp[:, seq:]
