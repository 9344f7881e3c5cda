"""Plain-PyTorch pieces shared by the references and the hand-derived backward statements of every op.

Shapes follow :mod:`tttexp.ops.reference`: activations ``[B, H, T, F]``, per-head affine ``[H, F]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

LN_EPS = 1e-6
State = tuple[Tensor, ...]

GELU_A = 0.044715
GELU_C = math.sqrt(2.0 / math.pi)


def compute_dtype(x: Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise: the dtype the state and statistics are kept in."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def layer_norm(z: Tensor, w: Tensor, b: Tensor, eps: float = LN_EPS) -> Tensor:
    """LayerNorm over the last dim with per-head affine ``w, b`` of shape ``[H, F]`` (z is ``[B, H, T, F]``)."""
    mu = z.mean(-1, keepdim=True)
    var = (z - mu).pow(2).mean(-1, keepdim=True)
    return (z - mu) * torch.rsqrt(var + eps) * w[:, None, :] + b[:, None, :]


def layer_norm_l2_grad(z: Tensor, target: Tensor, w: Tensor, b: Tensor, eps: float = LN_EPS) -> Tensor:
    """d/dz of 0.5 * ||LN(z) - target||^2, per row, in closed form."""
    f = z.shape[-1]
    mu = z.mean(-1, keepdim=True)
    var = (z - mu).pow(2).mean(-1, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    xhat = (z - mu) * rstd
    g_xhat = (xhat * w[:, None, :] + b[:, None, :] - target) * w[:, None, :]
    return (
        f * g_xhat - g_xhat.sum(-1, keepdim=True) - xhat * (g_xhat * xhat).sum(-1, keepdim=True)
    ) * (rstd / f)


def gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def gelu_tanh_grad(x: Tensor) -> Tensor:
    inner = GELU_C * (x + GELU_A * x.pow(3))
    t = torch.tanh(inner)
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_C * (1.0 + 3 * GELU_A * x * x)


def gelu_parts(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """gelu_tanh and its first and second derivatives."""
    u = GELU_C * (x + GELU_A * x**3)
    du = GELU_C * (1.0 + 3.0 * GELU_A * x * x)
    ddu = 6.0 * GELU_A * GELU_C * x
    t = torch.tanh(u)
    sech2 = 1.0 - t * t
    s = 0.5 * x * (1.0 + t)
    ds = 0.5 * (1.0 + t) + 0.5 * x * sech2 * du
    dds = sech2 * (du + 0.5 * x * (ddu - 2.0 * t * du * du))
    return s, ds, dds


def ln_rows(z: Tensor) -> tuple[Tensor, Tensor]:
    """Normalised rows (no affine) and their ``rstd`` (``[..., 1]``)."""
    mu = z.mean(-1, keepdim=True)
    xc = z - mu
    rstd = torch.rsqrt((xc * xc).mean(-1, keepdim=True) + LN_EPS)
    return xc * rstd, rstd


def ln_rows_bwd(dxh: Tensor, xh: Tensor, rstd: Tensor) -> Tensor:
    """Gradient wrt ``z`` of a loss through ``xh = (z - mean z) * rstd(z)``, given ``dL/dxh``."""
    return rstd * (dxh - dxh.mean(-1, keepdim=True) - xh * (dxh * xh).mean(-1, keepdim=True))


def causal_mask(m: int, device: torch.device) -> Tensor:
    """``[m, m]`` bool, true on and below the diagonal (token i sees tokens j <= i)."""
    return torch.ones(m, m, dtype=torch.bool, device=device).tril()


def reset_to(W: Tensor, b: Tensor, W0: Tensor, b0: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    """Rows where ``r`` ([B] bool) is set take the learned ``W0, b0`` (``W [B, H, P, Q]``, ``b [B, H, Q]``)."""
    return torch.where(r[:, None, None, None], W0.expand_as(W), W), torch.where(r[:, None, None], b0.expand_as(b), b)


def causal_sum(scores: Tensor, values: Tensor) -> Tensor:
    """``sum_{j<=i} scores[i, j] * values[j]`` for every i: ``tril(scores) @ values``."""
    return scores.tril() @ values


def prefix_sum(values: Tensor) -> Tensor:
    """Running sum over the token dim (``-2``)."""
    return values.cumsum(-2)
