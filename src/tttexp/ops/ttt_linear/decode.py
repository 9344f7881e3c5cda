"""Triton decode step of TTT-Linear: one token per (batch, head) with the mini-batch's accumulators.

Same inputs and results as :func:`tttexp.ops.ttt_linear.reference.minibatch_linear` with ``m = 1`` (inference only,
no autograd): given the mini-batch start state ``(W, b)`` and the accumulators ``(sW, sb)`` of the tokens already
seen in this mini-batch, the token at position ``i`` of its mini-batch (weight ``tok = tok_all[i:i+1]``) gives::

    Z = xk W + b,  lg = lr * G(Z),  Zbar = xq W + b - tok * (xq sW + sb + (xq . xk + 1) lg)
    out = xq + LN(Zbar),  sW' = sW + xk^T lg,  sb' = sb + lg

The caller applies ``tttexp.ops.reference.apply_accumulators`` at the mini-batch boundary. One program per
(batch, head); the products are matrix-vector, done as broadcast-and-reduce in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from tttexp.ops.triton_utils import EPS, padded_dim


@triton.jit
def _row_ln(z, cmask, F: tl.constexpr):
    mu = tl.sum(z, 0) / F
    xc = tl.where(cmask, z - mu, 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, 0) / F + EPS)
    return xc * rstd, rstd


@triton.jit
def _linear_decode_kernel(
    xq_ptr, xk_ptr, xv_ptr, lr_ptr, tok_ptr, lnw_ptr, lnb_ptr, w_ptr, b_ptr, sw_ptr, sb_ptr,
    out_ptr, sw_out_ptr, sb_out_ptr, H,
    F: tl.constexpr, FP: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    h = pid % H
    ri = tl.arange(0, FP)  # input (row) index of W
    ci = tl.arange(0, FP)  # output (column) index of W
    rmask = ri < F
    cmask = ci < F
    w_off = pid * F * F + ri[:, None] * F + ci[None, :]
    w_msk = rmask[:, None] & cmask[None, :]
    xq_r = tl.load(xq_ptr + pid * F + ri, mask=rmask, other=0.0).to(tl.float32)
    xk_r = tl.load(xk_ptr + pid * F + ri, mask=rmask, other=0.0).to(tl.float32)
    xq_c = tl.load(xq_ptr + pid * F + ci, mask=cmask, other=0.0).to(tl.float32)
    xk_c = tl.load(xk_ptr + pid * F + ci, mask=cmask, other=0.0).to(tl.float32)
    xv_c = tl.load(xv_ptr + pid * F + ci, mask=cmask, other=0.0).to(tl.float32)
    gw = tl.load(lnw_ptr + h * F + ci, mask=cmask, other=0.0).to(tl.float32)
    gb = tl.load(lnb_ptr + h * F + ci, mask=cmask, other=0.0).to(tl.float32)
    eta = tl.load(lr_ptr + pid).to(tl.float32)
    t = tl.load(tok_ptr).to(tl.float32)
    W = tl.load(w_ptr + w_off, mask=w_msk, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + pid * F + ci, mask=cmask, other=0.0).to(tl.float32)
    sW = tl.load(sw_ptr + w_off, mask=w_msk, other=0.0).to(tl.float32)
    sb = tl.load(sb_ptr + pid * F + ci, mask=cmask, other=0.0).to(tl.float32)
    # inner gradient at the mini-batch start state
    z = tl.sum(xk_r[:, None] * W, 0) + b
    xh, rstd = _row_ln(z, cmask, F)
    gx = (xh * gw + gb - (xv_c - xk_c)) * gw
    g = tl.where(cmask, rstd * (gx - tl.sum(gx, 0) / F - xh * (tl.sum(gx * xh, 0) / F)), 0.0)
    lg = eta * g
    qk = tl.sum(xq_c * xk_c, 0)
    zbar = tl.sum(xq_r[:, None] * (W - t * sW), 0) + b - t * (sb + (qk + 1.0) * lg)
    xh2, _ = _row_ln(zbar, cmask, F)
    out = xq_c + xh2 * gw + gb
    tl.store(out_ptr + pid * F + ci, out.to(out_ptr.dtype.element_ty), mask=cmask)
    tl.store(sw_out_ptr + w_off, sW + xk_r[:, None] * lg[None, :], mask=w_msk)
    tl.store(sb_out_ptr + pid * F + ci, sb + lg, mask=cmask)


def linear_decode_step(
    xq: Tensor, xk: Tensor, xv: Tensor, lr: Tensor, tok: Tensor, ln_w: Tensor, ln_b: Tensor,
    state: tuple[Tensor, Tensor], acc: tuple[Tensor, Tensor],
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """One token: ``xq, xk, xv [B,H,1,F]``, ``lr [B,H,1]``, ``tok [1]``; ``state`` and ``acc`` are
    ``(W [B,H,F,F], b [B,H,F])``. Returns ``(out [B,H,1,F], new accumulators (fp32))``."""
    bsz, heads, one, f = xq.shape
    if one != 1:
        raise ValueError(f"linear_decode_step takes one token, got {one}")
    xq, xk, xv = (x.to(xq.dtype).contiguous() for x in (xq, xk, xv))
    W, b = (s.contiguous() for s in state)
    sW, sb = (a.contiguous() for a in acc)
    out = torch.empty_like(xq)
    sW_new = torch.empty(bsz, heads, f, f, device=xq.device, dtype=torch.float32)
    sb_new = torch.empty(bsz, heads, f, device=xq.device, dtype=torch.float32)
    _linear_decode_kernel[(bsz * heads,)](
        xq, xk, xv, lr.contiguous(), tok.contiguous(), ln_w.contiguous(), ln_b.contiguous(), W, b, sW, sb,
        out, sW_new, sb_new, heads, F=f, FP=padded_dim(f), num_warps=4,
    )
    return out, (sW_new, sb_new)
