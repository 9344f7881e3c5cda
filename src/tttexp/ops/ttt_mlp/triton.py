"""Triton forward kernel of the TTT-MLP inner loop (hidden 4F, gelu_tanh).

``W1 [F, 4F]`` and ``W2 [4F, F]`` in fp32 are 64 KB each at F=64: too big for one program's registers. The state
lives in a per-(batch, head) fp32 buffer in global memory (L2-resident: 12 MB for 96 programs at F=64) that the
kernel updates in place; each mini-batch walks the hidden dim in chunks of ``HC`` columns twice:

1. ``Z2 = b2 + sum_c gelu(Xk W1_c + b1_c) W2_c``, then ``G2`` (LayerNorm-L2 gradient) and ``Lg2 = eta * G2``;
2. per chunk: ``G1_c = (G2 W2_c^T) * gelu'(Z1_c)``, ``Z1bar_c`` by the dual form, ``X2bar_c = gelu(Z1bar_c)``,
   accumulate ``X2bar_c W2_c`` and ``X2bar_c X2_c^T``, then write the chunk's updated ``W1_c, b1_c, W2_c``.

The forward also copies the state every ``C`` mini-batches into checkpoints. The backward kernel sweeps the
checkpoint segments in reverse like the TTT-Linear one: it recomputes the segment's start states into scratch
slots, then walks the segment backwards. Per mini-batch it makes four passes over the hidden chunks (A: ``Z2``;
B: ``Z2bar`` and the second layer's dual-form pieces; C: the first layer's backward and what flows into ``G2``;
D: the backward through ``Z2 = X2 W2 + b2`` into the first layer). The carried state gradient lives in two
ping-pong buffers (read one, write the other) so that no chunk is overwritten while another warp may still read it.
The math is :mod:`tttexp.ops.ttt_mlp.math` (checked against autograd of the reference in float64).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from tttexp.ops.settings import MLPConfig
from tttexp.ops.triton_utils import dot_config, gelu, gelu_grad, gelu_parts, ln_rows, ln_rows_bwd, mm, padded_dim

DEFAULT_CONFIG = MLPConfig()


def _opts(warps: int, stages: int | None) -> dict[str, int]:
    return {"num_warps": warps} | ({"num_stages": stages} if stages else {})


@triton.jit
def _copy_state(src1, srcb1, src2, srcb2, dst1, dstb1, dst2, dstb2, w1_off, w2_off, hcols, cols,
                FP: tl.constexpr, HID: tl.constexpr, HC: tl.constexpr):
    """Copy one padded state (W1 [FP, HID], b1 [HID], W2 [HID, FP], b2 [FP]) chunk by chunk, the weights in the
    destination's dtype."""
    for c0 in range(0, HID, HC):
        tl.store(dst1 + c0 + w1_off, tl.load(src1 + c0 + w1_off).to(dst1.dtype.element_ty))
        tl.store(dstb1 + c0 + hcols, tl.load(srcb1 + c0 + hcols))
        tl.store(dst2 + c0 * FP + w2_off, tl.load(src2 + c0 * FP + w2_off).to(dst2.dtype.element_ty))
    tl.store(dstb2 + cols, tl.load(srcb2 + cols))


@triton.jit
def _z2(xk, p1, pb1, p2, b2, w1_off, w2_off, hcols, FP: tl.constexpr, HID: tl.constexpr, HC: tl.constexpr,
        BK: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, EMU: tl.constexpr):
    """Z2 = gelu(Xk W1 + b1) W2 + b2 over the hidden chunks of the state at (p1, pb1, p2)."""
    z2 = tl.zeros([BK, FP], dtype=tl.float32) + b2[None, :]
    for c0 in range(0, HID, HC):
        x2c = gelu(mm(xk, tl.load(p1 + c0 + w1_off), DT, PREC, EMU) + tl.load(pb1 + c0 + hcols)[None, :])
        z2 += mm(x2c, tl.load(p2 + c0 * FP + w2_off), DT, PREC, EMU)
    return z2


@triton.jit
def _tiles(F: tl.constexpr, FP: tl.constexpr, HID: tl.constexpr, HC: tl.constexpr, BK: tl.constexpr):
    """A program's index vectors (a mini-batch's rows, the padded and the hidden columns, the real-column mask) and
    the offsets of a [FP, HC] tile of W1, a [HC, FP] tile of W2 and a [BK, HC] tile of a [BK, HID] block, each at
    chunk offset 0."""
    rows = tl.arange(0, BK)
    cols = tl.arange(0, FP)
    hcols = tl.arange(0, HC)
    return (rows, cols, hcols, cols < F, cols[:, None] * HID + hcols[None, :], hcols[:, None] * FP + cols[None, :],
            rows[:, None] * HID + hcols[None, :])


@triton.jit
def _minibatch(xq_ptr, xk_ptr, xv_ptr, lr_ptr, tok_ptr, row, n, T, rows, cols, cmask,
               F: tl.constexpr, K: tl.constexpr):
    """Mini-batch ``n`` of sequence ``row`` (batch * heads + head): the offsets and masks of its [BK, FP] tiles and
    of its learning rates, its real rows ``m``, ``Xq``, ``Xk``, ``Xv``, the learning rates, the token weights and
    the last real token's weight."""
    start = n * K
    m = tl.minimum(T - start, K)
    rmask = rows < m
    xmsk = rmask[:, None] & cmask[None, :]
    x_off = row * T * F + (start + rows)[:, None] * F + cols[None, :]
    xq = tl.load(xq_ptr + x_off, mask=xmsk, other=0.0)
    xk = tl.load(xk_ptr + x_off, mask=xmsk, other=0.0)
    xv = tl.load(xv_ptr + x_off, mask=xmsk, other=0.0)
    eta = tl.load(lr_ptr + row * T + start + rows, mask=rmask, other=0.0).to(tl.float32)
    t = tl.load(tok_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    t_last = tl.load(tok_ptr + m - 1).to(tl.float32)
    return x_off, xmsk, row * T + start + rows, rmask, m, xq, xk, xv, eta, t, t_last


@triton.jit
def _lnl2(z2, xk, xv, eta, gw, gb, cmask, F: tl.constexpr):
    """``G2``, the LayerNorm-L2 gradient at ``Z2`` with target ``Xv - Xk``; ``Lg2 = eta G2``; and what
    :func:`_lnl2_bwd` takes of it: ``xh, rstd, gx, e``."""
    xh, rstd = ln_rows(z2, cmask, F)
    e = xh * gw[None, :] + gb[None, :] - (xv.to(tl.float32) - xk.to(tl.float32))
    gx = e * gw[None, :]
    g2 = ln_rows_bwd(gx, xh, rstd, cmask, F)
    return g2, eta[:, None] * g2, xh, rstd, gx, e


@triton.jit
def _slots(g1_ptr, gb1_ptr, g2_ptr, pid, cur, S1: tl.constexpr, HID: tl.constexpr):
    """Program ``pid``'s ping-pong slots of the carried gradient: W1, b1, W2 of the one read (the gradient of the
    state after this mini-batch), then of the one written."""
    rd = pid * 2 + cur
    wr = pid * 2 + 1 - cur
    return (g1_ptr + rd * S1, gb1_ptr + rd * HID, g2_ptr + rd * S1,
            g1_ptr + wr * S1, gb1_ptr + wr * HID, g2_ptr + wr * S1)


@triton.jit
def _mlp_fwd_kernel(
    xq_ptr, xk_ptr, xv_ptr, lr_ptr, tok_ptr, lnw_ptr, lnb_ptr,
    w1_ptr, b1_ptr, w2_ptr, b2_ptr, w10_ptr, b10_ptr, w20_ptr, b20_ptr, reset_ptr, out_ptr,
    ck1_ptr, ckb1_ptr, ck2_ptr, ckb2_ptr,
    T, N, NC, H,
    F: tl.constexpr, FP: tl.constexpr, HID: tl.constexpr, HC: tl.constexpr, BK: tl.constexpr, K: tl.constexpr,
    C: tl.constexpr, HAS_RESET: tl.constexpr, SAVE: tl.constexpr, OUT: tl.constexpr, SEGMENTS: tl.constexpr,
    DT: tl.constexpr, PREC: tl.constexpr, EMU: tl.constexpr,
):
    """One program per (batch, head) over all mini-batches; or, with ``SEGMENTS``, one per (batch, head, checkpoint
    segment) over its segment from a copy of its checkpoint at ``w*_ptr``. ``OUT``: write the outputs (without it,
    only the state chain and the checkpoints)."""
    pid = tl.program_id(0).to(tl.int64)
    if SEGMENTS:
        row = pid // NC
        n0 = (pid % NC) * C
        n1 = tl.minimum(n0 + C, N)
    else:
        row = pid
        n0 = 0
        n1 = N
    h = row % H
    bi = row // H
    rows, cols, hcols, cmask, w1_off, w2_off, z_off = _tiles(F, FP, HID, HC, BK)
    p1 = w1_ptr + pid * FP * HID
    pb1 = b1_ptr + pid * HID
    p2 = w2_ptr + pid * HID * FP
    gw = tl.load(lnw_ptr + h * F + cols, mask=cmask, other=0.0).to(tl.float32)
    gb = tl.load(lnb_ptr + h * F + cols, mask=cmask, other=0.0).to(tl.float32)
    b2 = tl.load(b2_ptr + pid * FP + cols)
    causal = rows[None, :] <= rows[:, None]
    for n in range(n0, n1):
        if SAVE:  # noqa: SIM102 (constexpr guard first)
            if n % C == 0:
                ck = pid * NC + n // C
                tl.store(b2_ptr + pid * FP + cols, b2)
                _copy_state(p1, pb1, p2, b2_ptr + pid * FP, ck1_ptr + ck * FP * HID, ckb1_ptr + ck * HID,
                            ck2_ptr + ck * HID * FP, ckb2_ptr + ck * FP, w1_off, w2_off, hcols, cols, FP, HID, HC)
        if HAS_RESET:  # noqa: SIM102 (constexpr guard first)
            if tl.load(reset_ptr + bi * N + n) != 0:
                _copy_state(w10_ptr + h * FP * HID, b10_ptr + h * HID, w20_ptr + h * HID * FP, b20_ptr + h * FP,
                            p1, pb1, p2, b2_ptr + pid * FP, w1_off, w2_off, hcols, cols, FP, HID, HC)
                b2 = tl.load(b20_ptr + h * FP + cols)
                tl.debug_barrier()
        x_off, xmsk, lr_off, rmask, m, xq, xk, xv, eta, t, t_last = _minibatch(
            xq_ptr, xk_ptr, xv_ptr, lr_ptr, tok_ptr, row, n, T, rows, cols, cmask, F, K)
        # pass 1: the inner model's prediction on Xk and its LayerNorm-L2 gradient
        z2 = _z2(xk, p1, pb1, p2, b2, w1_off, w2_off, hcols, FP, HID, HC, BK, DT, PREC, EMU)
        g2, lg2, xh, rstd, gx, e = _lnl2(z2, xk, xv, eta, gw, gb, cmask, F)
        if OUT:
            m1 = tl.where(causal, t[:, None] * (mm(xq, tl.trans(xk), DT, PREC, EMU) + 1.0), 0.0)
            acc = tl.zeros([BK, FP], dtype=tl.float32)
            s2 = tl.zeros([BK, BK], dtype=tl.float32)
        # pass 2: first layer's dual form, second layer's pieces, state update (each chunk read, then rewritten
        # by the same threads: same pointer tensor, same layout)
        for c0 in range(0, HID, HC):
            w1c = tl.load(p1 + c0 + w1_off)
            b1c = tl.load(pb1 + c0 + hcols)
            w2c = tl.load(p2 + c0 * FP + w2_off)
            z1c = mm(xk, w1c, DT, PREC, EMU) + b1c[None, :]
            x2c = gelu(z1c)
            lg1c = eta[:, None] * mm(g2, tl.trans(w2c), DT, PREC, EMU) * gelu_grad(z1c)
            if OUT:
                x2bar = gelu(mm(xq, w1c, DT, PREC, EMU) + b1c[None, :] - mm(m1, lg1c, DT, PREC, EMU))
                acc += mm(x2bar, w2c, DT, PREC, EMU)
                s2 += mm(x2bar, tl.trans(x2c), DT, PREC, EMU)
            tl.store(p1 + c0 + w1_off, w1c - t_last * mm(tl.trans(xk), lg1c, DT, PREC, EMU))
            tl.store(pb1 + c0 + hcols, b1c - t_last * tl.sum(lg1c, 0))
            tl.store(p2 + c0 * FP + w2_off, w2c - t_last * mm(tl.trans(x2c), lg2, DT, PREC, EMU))
        if OUT:
            m2 = tl.where(causal, t[:, None] * (s2 + 1.0), 0.0)
            z2bar = acc + b2[None, :] - mm(m2, lg2, DT, PREC, EMU)
            xh2, rstd2 = ln_rows(z2bar, cmask, F)
            out = xq.to(tl.float32) + xh2 * gw[None, :] + gb[None, :]
            tl.store(out_ptr + x_off, out.to(out_ptr.dtype.element_ty), mask=xmsk)
        b2 = b2 - t_last * tl.sum(lg2, 0)
        tl.debug_barrier()
    tl.store(b2_ptr + pid * FP + cols, b2)


@triton.jit
def _mlp_update(xk, xv, eta, t_last, gw, gb, p1, pb1, p2, pb2, q1, qb1, q2, qb2, w1_off, w2_off, hcols, cols, cmask,
                F: tl.constexpr, FP: tl.constexpr, HID: tl.constexpr, HC: tl.constexpr, BK: tl.constexpr,
                DT: tl.constexpr, PREC: tl.constexpr, EMU: tl.constexpr):
    """The state after one mini-batch: read the state at (p*), write the updated one at (q*)."""
    b2 = tl.load(pb2 + cols)
    z2 = _z2(xk, p1, pb1, p2, b2, w1_off, w2_off, hcols, FP, HID, HC, BK, DT, PREC, EMU)
    g2, lg2, xh, rstd, gx, e = _lnl2(z2, xk, xv, eta, gw, gb, cmask, F)
    for c0 in range(0, HID, HC):
        w1c = tl.load(p1 + c0 + w1_off)
        b1c = tl.load(pb1 + c0 + hcols)
        w2c = tl.load(p2 + c0 * FP + w2_off)
        z1c = mm(xk, w1c, DT, PREC, EMU) + b1c[None, :]
        lg1c = eta[:, None] * mm(g2, tl.trans(w2c), DT, PREC, EMU) * gelu_grad(z1c)
        tl.store(q1 + c0 + w1_off, w1c - t_last * mm(tl.trans(xk), lg1c, DT, PREC, EMU))
        tl.store(qb1 + c0 + hcols, b1c - t_last * tl.sum(lg1c, 0))
        tl.store(q2 + c0 * FP + w2_off, w2c - t_last * mm(tl.trans(gelu(z1c)), lg2, DT, PREC, EMU))
    tl.store(qb2 + cols, b2 - t_last * tl.sum(lg2, 0))


@triton.jit
def _segment_states(
    ck1_ptr, ckb1_ptr, ck2_ptr, ckb2_ptr, sc1_ptr, scb1_ptr, sc2_ptr, scb2_ptr, w10_ptr, b10_ptr, w20_ptr, b20_ptr,
    reset_ptr, xk_ptr, xv_ptr, lr_ptr, tok_ptr, pid, bi, h, s_idx, n0, n1, T, N, NC, gw, gb,
    rows, cols, hcols, cmask, w1_off, w2_off,
    F: tl.constexpr, FP: tl.constexpr, HID: tl.constexpr, HC: tl.constexpr, BK: tl.constexpr, K: tl.constexpr,
    C: tl.constexpr, HAS_RESET: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, EMU: tl.constexpr,
):
    """Recompute the start states of segment ``s_idx``'s mini-batches ``n0 .. n1-1`` into the program's ``C``
    scratch slots, from the segment's checkpoint."""
    S1: tl.constexpr = FP * HID
    ck = pid * NC + s_idx
    sl0 = pid * C
    _copy_state(ck1_ptr + ck * S1, ckb1_ptr + ck * HID, ck2_ptr + ck * S1, ckb2_ptr + ck * FP,
                sc1_ptr + sl0 * S1, scb1_ptr + sl0 * HID, sc2_ptr + sl0 * S1, scb2_ptr + sl0 * FP,
                w1_off, w2_off, hcols, cols, FP, HID, HC)
    tl.debug_barrier()
    for n in range(n0, n1):
        sl = pid * C + n - n0
        if HAS_RESET:  # noqa: SIM102 (constexpr guard first)
            if tl.load(reset_ptr + bi * N + n) != 0:
                _copy_state(w10_ptr + h * S1, b10_ptr + h * HID, w20_ptr + h * S1, b20_ptr + h * FP,
                            sc1_ptr + sl * S1, scb1_ptr + sl * HID, sc2_ptr + sl * S1, scb2_ptr + sl * FP,
                            w1_off, w2_off, hcols, cols, FP, HID, HC)
                tl.debug_barrier()
        if n < n1 - 1:
            # (no Xq here: xk_ptr stands in for it and the unused load is dropped)
            x_off, xmsk, lr_off, rmask, m, xq, xk, xv, eta, t, t_last = _minibatch(
                xk_ptr, xk_ptr, xv_ptr, lr_ptr, tok_ptr, pid, n, T, rows, cols, cmask, F, K)
            _mlp_update(xk, xv, eta, t_last, gw, gb,
                        sc1_ptr + sl * S1, scb1_ptr + sl * HID, sc2_ptr + sl * S1, scb2_ptr + sl * FP,
                        sc1_ptr + (sl + 1) * S1, scb1_ptr + (sl + 1) * HID, sc2_ptr + (sl + 1) * S1,
                        scb2_ptr + (sl + 1) * FP, w1_off, w2_off, hcols, cols, cmask,
                        F, FP, HID, HC, BK, DT, PREC, EMU)
            tl.debug_barrier()


@triton.jit
def _lnl2_bwd(dg2, xh, rstd, gx, e, gw, cmask, F: tl.constexpr):
    """Back through ``G2 = LN-L2 gradient at Z2``: ``dZ2``, ``dgx * gw`` (``dXk``'s part; ``-dXv``) and the rows'
    sums for the LayerNorm weight and bias."""
    a = tl.sum(gx, 1) / F
    c = tl.sum(gx * xh, 1) / F
    dgx = ln_rows_bwd(dg2, xh, rstd, cmask, F)
    dxh = (-rstd[:, None] * (c[:, None] * dg2 + (tl.sum(dg2 * xh, 1) / F)[:, None] * gx)
           + dgx * (gw * gw)[None, :])
    drstd = tl.sum(dg2 * (gx - a[:, None] - xh * c[:, None]), 1)
    dgw_rows = tl.sum(dgx * (e + gw[None, :] * xh), 0)
    dgb_rows = tl.sum(dgx * gw[None, :], 0)
    dgxw = dgx * gw[None, :]
    dz2 = ln_rows_bwd(dxh, xh, rstd, cmask, F) - (drstd * rstd * rstd / F)[:, None] * xh
    return dz2, dgxw, dgw_rows, dgb_rows


@triton.jit
def _z2_bwd(dg2, xh, rstd, gx, e, gw, cmask, dxk, dgw, dgb, db2, xk, p1, pb1, p2, dz1_p, dw1, dwb1, dw2,
            w1_off, w2_off, z_off, hcols,
            F: tl.constexpr, FP: tl.constexpr, HID: tl.constexpr, HC: tl.constexpr, BK: tl.constexpr,
            DT: tl.constexpr, PREC: tl.constexpr, EMU: tl.constexpr):
    """From ``dG2`` back through the LayerNorm-L2 gradient and ``Z2 = X2 W2 + b2`` into the first layer. Adds to
    the state gradient being written (``dw*``; ``dz1_p`` holds the part of ``dZ1`` formed before ``dZ2`` was
    known) and returns ``dXk`` (``dxk`` plus this part), ``dXv``, and the sums ``dgw``, ``dgb`` (the LayerNorm's
    weight and bias) and ``db2`` with this mini-batch's rows added."""
    dz2, dgxw, dgw_rows, dgb_rows = _lnl2_bwd(dg2, xh, rstd, gx, e, gw, cmask, F)
    dxk += dgxw
    tl.debug_barrier()  # this mini-batch's first pass over the chunks has written what the loop below reads
    for c0 in range(0, HID, HC):
        w1c = tl.load(p1 + c0 + w1_off)
        b1c = tl.load(pb1 + c0 + hcols)
        w2c = tl.load(p2 + c0 * FP + w2_off)
        z1c = mm(xk, w1c, DT, PREC, EMU) + b1c[None, :]
        x2c, ds1c, _ = gelu_parts(z1c)
        dz1c = tl.load(dz1_p + c0 + z_off) + mm(dz2, tl.trans(w2c), DT, PREC, EMU) * ds1c
        dxk += mm(dz1c, tl.trans(w1c), DT, PREC, EMU)
        tl.store(dw2 + c0 * FP + w2_off, tl.load(dw2 + c0 * FP + w2_off) + mm(tl.trans(x2c), dz2, DT, PREC, EMU))
        tl.store(dw1 + c0 + w1_off, tl.load(dw1 + c0 + w1_off) + mm(tl.trans(xk), dz1c, DT, PREC, EMU))
        tl.store(dwb1 + c0 + hcols, tl.load(dwb1 + c0 + hcols) + tl.sum(dz1c, 0))
    return dxk, -dgxw, dgw + dgw_rows, dgb + dgb_rows, db2 + tl.sum(dz2, 0)


@triton.jit
def _reset_grad(reset_ptr, bi, N, n, di1_ptr, dib1_ptr, di2_ptr, dib2_ptr, dw1, dwb1, dw2, db2, pid,
                w1_off, w2_off, hcols, cols,
                FP: tl.constexpr, HID: tl.constexpr, HC: tl.constexpr, HAS_RESET: tl.constexpr):
    """If mini-batch ``n`` started from a reset state, the carried gradient goes to the learned initial state and
    restarts from zero. Returns ``db2`` (zero after a reset)."""
    if HAS_RESET:  # noqa: SIM102 (constexpr guard first)
        if tl.load(reset_ptr + bi * N + n) != 0:
            S1: tl.constexpr = FP * HID
            for c0 in range(0, HID, HC):
                o1 = pid * S1 + c0 + w1_off
                o2 = pid * S1 + c0 * FP + w2_off
                tl.store(di1_ptr + o1, tl.load(di1_ptr + o1) + tl.load(dw1 + c0 + w1_off))
                tl.store(di2_ptr + o2, tl.load(di2_ptr + o2) + tl.load(dw2 + c0 * FP + w2_off))
                tl.store(dib1_ptr + pid * HID + c0 + hcols,
                         tl.load(dib1_ptr + pid * HID + c0 + hcols) + tl.load(dwb1 + c0 + hcols))
                tl.store(dw1 + c0 + w1_off, tl.zeros([FP, HC], dtype=tl.float32))
                tl.store(dw2 + c0 * FP + w2_off, tl.zeros([HC, FP], dtype=tl.float32))
                tl.store(dwb1 + c0 + hcols, tl.zeros([HC], dtype=tl.float32))
            tl.store(dib2_ptr + pid * FP + cols, tl.load(dib2_ptr + pid * FP + cols) + db2)
            db2 = tl.zeros([FP], dtype=tl.float32)
            tl.debug_barrier()
    return db2


@triton.jit
def _store_sums(dtok_ptr, dlnw_ptr, dlnb_ptr, row, dtok, dgw, dgb, rows, cols, cmask,
                F: tl.constexpr, BK: tl.constexpr):
    """A program's sums over its mini-batches: the token weights' and the LayerNorm weight's and bias' gradients."""
    tl.store(dtok_ptr + row * BK + rows, dtok)
    tl.store(dlnw_ptr + row * F + cols, dgw, mask=cmask)
    tl.store(dlnb_ptr + row * F + cols, dgb, mask=cmask)


@triton.jit
def _mlp_bwd_kernel(
    xq_ptr, xk_ptr, xv_ptr, lr_ptr, tok_ptr, lnw_ptr, lnb_ptr, w10_ptr, b10_ptr, w20_ptr, b20_ptr, reset_ptr,
    ck1_ptr, ckb1_ptr, ck2_ptr, ckb2_ptr, sc1_ptr, scb1_ptr, sc2_ptr, scb2_ptr,
    g1_ptr, gb1_ptr, g2_ptr, gb2_ptr, dz1_ptr, di1_ptr, dib1_ptr, di2_ptr, dib2_ptr,
    dout_ptr, dxq_ptr, dxk_ptr, dxv_ptr, dlr_ptr, dtok_ptr, dlnw_ptr, dlnb_ptr,
    T, N, NC, H,
    F: tl.constexpr, FP: tl.constexpr, HID: tl.constexpr, HC: tl.constexpr, BK: tl.constexpr, K: tl.constexpr,
    C: tl.constexpr, HAS_RESET: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, EMU: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    h = pid % H
    bi = pid // H
    rows, cols, hcols, cmask, w1_off, w2_off, z_off = _tiles(F, FP, HID, HC, BK)
    S1: tl.constexpr = FP * HID
    gw = tl.load(lnw_ptr + h * F + cols, mask=cmask, other=0.0).to(tl.float32)
    gb = tl.load(lnb_ptr + h * F + cols, mask=cmask, other=0.0).to(tl.float32)
    db2 = tl.load(gb2_ptr + pid * FP + cols)
    dtok = tl.zeros([BK], dtype=tl.float32)
    dgw = tl.zeros([FP], dtype=tl.float32)
    dgb = tl.zeros([FP], dtype=tl.float32)
    causal = rows[None, :] <= rows[:, None]
    cur = 0  # ping-pong slot of the carried state gradient
    for si in range(NC):
        s_idx = NC - 1 - si
        n0 = s_idx * C
        n1 = tl.minimum(n0 + C, N)
        _segment_states(ck1_ptr, ckb1_ptr, ck2_ptr, ckb2_ptr, sc1_ptr, scb1_ptr, sc2_ptr, scb2_ptr,
                        w10_ptr, b10_ptr, w20_ptr, b20_ptr, reset_ptr, xk_ptr, xv_ptr, lr_ptr, tok_ptr,
                        pid, bi, h, s_idx, n0, n1, T, N, NC, gw, gb, rows, cols, hcols, cmask, w1_off, w2_off,
                        F, FP, HID, HC, BK, K, C, HAS_RESET, DT, PREC, EMU)
        for i in range(n1 - n0):
            n = n1 - 1 - i
            sl = pid * C + n - n0
            p1 = sc1_ptr + sl * S1
            pb1 = scb1_ptr + sl * HID
            p2 = sc2_ptr + sl * S1
            b2 = tl.load(scb2_ptr + sl * FP + cols)
            dn1, dnb1, dn2, dw1, dwb1, dw2 = _slots(g1_ptr, gb1_ptr, g2_ptr, pid, cur, S1, HID)
            x_off, xmsk, lr_off, rmask, m, xq, xk, xv, eta, t, t_last = _minibatch(
                xq_ptr, xk_ptr, xv_ptr, lr_ptr, tok_ptr, pid, n, T, rows, cols, cmask, F, K)
            dout = tl.load(dout_ptr + x_off, mask=xmsk, other=0.0).to(tl.float32)
            # pass A: Z2, G2
            z2 = _z2(xk, p1, pb1, p2, b2, w1_off, w2_off, hcols, FP, HID, HC, BK, DT, PREC, EMU)
            g2, lg2, xh, rstd, gx, e = _lnl2(z2, xk, xv, eta, gw, gb, cmask, F)
            s1 = mm(xq, tl.trans(xk), DT, PREC, EMU) + 1.0
            m1 = tl.where(causal, t[:, None] * s1, 0.0)
            # pass B: Z2bar and the second layer's dual-form terms; X2 dW2n
            acc = tl.zeros([BK, FP], dtype=tl.float32)
            s2 = tl.zeros([BK, BK], dtype=tl.float32)
            q2 = tl.zeros([BK, FP], dtype=tl.float32) + db2[None, :]
            for c0 in range(0, HID, HC):
                w1c = tl.load(p1 + c0 + w1_off)
                b1c = tl.load(pb1 + c0 + hcols)
                w2c = tl.load(p2 + c0 * FP + w2_off)
                z1c = mm(xk, w1c, DT, PREC, EMU) + b1c[None, :]
                x2c = gelu(z1c)
                lg1c = eta[:, None] * mm(g2, tl.trans(w2c), DT, PREC, EMU) * gelu_grad(z1c)
                x2bar = gelu(mm(xq, w1c, DT, PREC, EMU) + b1c[None, :] - mm(m1, lg1c, DT, PREC, EMU))
                acc += mm(x2bar, w2c, DT, PREC, EMU)
                s2 += mm(x2bar, tl.trans(x2c), DT, PREC, EMU)
                q2 += mm(x2c, tl.load(dn2 + c0 * FP + w2_off), DT, PREC, EMU)
            s2 += 1.0
            m2 = tl.where(causal, t[:, None] * s2, 0.0)
            z2bar = acc + b2[None, :] - mm(m2, lg2, DT, PREC, EMU)
            xh2, rstd2 = ln_rows(z2bar, cmask, F)
            dgw += tl.sum(dout * xh2, 0)
            dgb += tl.sum(dout, 0)
            dz2bar = ln_rows_bwd(dout * gw[None, :], xh2, rstd2, cmask, F)
            dm2 = tl.where(causal, -mm(dz2bar, tl.trans(lg2), DT, PREC, EMU), 0.0)
            dlg2 = -mm(tl.trans(m2), dz2bar, DT, PREC, EMU) - t_last * q2
            dt_last = -tl.sum(tl.sum(q2 * lg2, 1), 0)
            dtok += tl.sum(dm2 * s2, 1)
            ds2 = dm2 * t[:, None]
            dlr = tl.sum(dlg2 * g2, 1)
            dg2 = eta[:, None] * dlg2
            db2 = db2 + tl.sum(dz2bar, 0)
            dxq = dout
            dxk = tl.zeros([BK, FP], dtype=tl.float32)
            dm1 = tl.zeros([BK, BK], dtype=tl.float32)
            # pass C: first layer's backward, the part of dX2 known so far, flow into G2
            for c0 in range(0, HID, HC):
                w1c = tl.load(p1 + c0 + w1_off)
                b1c = tl.load(pb1 + c0 + hcols)
                w2c = tl.load(p2 + c0 * FP + w2_off)
                dn1c = tl.load(dn1 + c0 + w1_off)
                dnb1c = tl.load(dnb1 + c0 + hcols)
                dn2c = tl.load(dn2 + c0 * FP + w2_off)
                z1c = mm(xk, w1c, DT, PREC, EMU) + b1c[None, :]
                x2c, ds1c, dds1c = gelu_parts(z1c)
                pc = mm(g2, tl.trans(w2c), DT, PREC, EMU)
                g1c = pc * ds1c
                lg1c = eta[:, None] * g1c
                x2bar, ds1bar, _ = gelu_parts(mm(xq, w1c, DT, PREC, EMU) + b1c[None, :] - mm(m1, lg1c, DT, PREC, EMU))
                dz1bar = (mm(dz2bar, tl.trans(w2c), DT, PREC, EMU) + mm(ds2, x2c, DT, PREC, EMU)) * ds1bar
                dxq += mm(dz1bar, tl.trans(w1c), DT, PREC, EMU)
                dm1 -= mm(dz1bar, tl.trans(lg1c), DT, PREC, EMU)
                q1c = mm(xk, dn1c, DT, PREC, EMU) + dnb1c[None, :]
                dlg1c = -mm(tl.trans(m1), dz1bar, DT, PREC, EMU) - t_last * q1c
                dt_last -= tl.sum(tl.sum(q1c * lg1c, 1), 0)
                dxk -= t_last * mm(lg1c, tl.trans(dn1c), DT, PREC, EMU)
                dlr += tl.sum(dlg1c * g1c, 1)
                dg1c = eta[:, None] * dlg1c
                dpc = dg1c * ds1c
                dx2p = mm(tl.trans(ds2), x2bar, DT, PREC, EMU) - t_last * mm(lg2, tl.trans(dn2c), DT, PREC, EMU)
                tl.store(dz1_ptr + pid * BK * HID + c0 + z_off, dg1c * pc * dds1c + dx2p * ds1c)
                dg2 += mm(dpc, w2c, DT, PREC, EMU)
                tl.store(dw2 + c0 * FP + w2_off, dn2c + mm(tl.trans(x2bar), dz2bar, DT, PREC, EMU)
                         + mm(tl.trans(dpc), g2, DT, PREC, EMU))
                tl.store(dw1 + c0 + w1_off, dn1c + mm(tl.trans(xq), dz1bar, DT, PREC, EMU))
                tl.store(dwb1 + c0 + hcols, dnb1c + tl.sum(dz1bar, 0))
            dm1 = tl.where(causal, dm1, 0.0)
            dtok += tl.sum(dm1 * s1, 1) + tl.where(rows == m - 1, dt_last, 0.0)
            ds1m = dm1 * t[:, None]
            dxq += mm(ds1m, xk, DT, PREC, EMU)
            dxk += mm(tl.trans(ds1m), xq, DT, PREC, EMU)
            dxk, dxv, dgw, dgb, db2 = _z2_bwd(dg2, xh, rstd, gx, e, gw, cmask, dxk, dgw, dgb, db2, xk, p1, pb1, p2,
                                              dz1_ptr + pid * BK * HID, dw1, dwb1, dw2, w1_off, w2_off, z_off, hcols,
                                              F, FP, HID, HC, BK, DT, PREC, EMU)
            tl.store(dxq_ptr + x_off, dxq.to(dxq_ptr.dtype.element_ty), mask=xmsk)
            tl.store(dxk_ptr + x_off, dxk.to(dxk_ptr.dtype.element_ty), mask=xmsk)
            tl.store(dxv_ptr + x_off, dxv.to(dxv_ptr.dtype.element_ty), mask=xmsk)
            tl.store(dlr_ptr + lr_off, dlr.to(dlr_ptr.dtype.element_ty), mask=rmask)
            tl.debug_barrier()
            db2 = _reset_grad(reset_ptr, bi, N, n, di1_ptr, dib1_ptr, di2_ptr, dib2_ptr, dw1, dwb1, dw2, db2, pid,
                              w1_off, w2_off, hcols, cols, FP, HID, HC, HAS_RESET)
            cur = 1 - cur
    tl.store(gb2_ptr + pid * FP + cols, db2)
    _store_sums(dtok_ptr, dlnw_ptr, dlnb_ptr, pid, dtok, dgw, dgb, rows, cols, cmask, F, BK)


def _padded(s: Tensor, fp: int, dims: tuple[int, ...]) -> Tensor:
    """fp32 copy of ``s`` with each dim in ``dims`` zero-padded to ``fp``."""
    shape = list(s.shape)
    for d in dims:
        shape[d] = fp
    out = s.new_zeros(shape, dtype=torch.float32)
    out[tuple(slice(0, n) for n in s.shape)] = s
    return out


def _dims(xq: Tensor, tok: Tensor, config: MLPConfig) -> dict[str, int]:
    every = config.every
    bsz, heads, seq, f = xq.shape
    k = tok.shape[0]
    n_mb = math.ceil(seq / k)
    hid = 4 * f
    hc = config.hc if hid % config.hc == 0 else math.gcd(hid, config.hc)
    return dict(bsz=bsz, heads=heads, seq=seq, f=f, k=k, n_mb=n_mb, n_ck=math.ceil(n_mb / every), fp=padded_dim(f),
                hid=hid, hc=hc, bk=max(16, triton.next_power_of_2(k)))


def _padded_init(init_state: tuple[Tensor, ...], fp: int) -> tuple[Tensor, ...]:
    W10, b10, W20, b20 = init_state
    return _padded(W10, fp, (1,)), _padded(b10, fp, ()), _padded(W20, fp, (2,)), _padded(b20, fp, (1,))


def mlp_forward(
    xq: Tensor, xk: Tensor, xv: Tensor, lr: Tensor, tok: Tensor, ln_w: Tensor, ln_b: Tensor,
    init_state: tuple[Tensor, ...], state: tuple[Tensor, ...] | None, reset: Tensor | None,
    save: bool = False, config: MLPConfig = DEFAULT_CONFIG,
) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Run the TTT-MLP forward kernel (contiguous inputs, ``reset`` uint8 ``[B, N]`` or None).

    Returns ``(out, final state (W1, b1, W2, b2) in fp32, checkpoints)``; the checkpoints are padded
    ``[B*H, NC, ...]`` state tensors every ``config.every`` mini-batches (``NC = 0`` unless ``save``)."""
    every = config.every
    d = _dims(xq, tok, config)
    fp, hid, bh = d["fp"], d["hid"], d["bsz"] * d["heads"]
    p_init = _padded_init(init_state, fp)
    if state is None:
        work = [p.unsqueeze(0).expand(d["bsz"], *p.shape).clone(memory_format=torch.contiguous_format)
                for p in p_init]
    else:
        W1, b1, W2, b2 = state
        work = [_padded(W1, fp, (2,)), _padded(b1, fp, ()), _padded(W2, fp, (3,)), _padded(b2, fp, (2,))]
    nck = d["n_ck"] if save else 0
    f32 = dict(device=xq.device, dtype=torch.float32)
    ckpt = (torch.empty(bh, nck, fp, hid, **f32), torch.empty(bh, nck, hid, **f32),
            torch.empty(bh, nck, hid, fp, **f32), torch.empty(bh, nck, fp, **f32))
    out = torch.empty_like(xq)
    dt, prec, emu = dot_config(xq.dtype, config.lowp)
    split = save and config.split_fwd  # the chain writes the checkpoints, then the segments' outputs in parallel
    reset_arg = reset if reset is not None else tok
    consts = dict(F=d["f"], FP=fp, HID=hid, HC=d["hc"], BK=d["bk"], K=d["k"], C=every, HAS_RESET=reset is not None,
                  DT=dt, PREC=prec, EMU=emu, **_opts(config.warps, config.fwd_stages))
    sizes = (d["seq"], d["n_mb"], d["n_ck"], d["heads"])
    _mlp_fwd_kernel[(bh,)](
        xq, xk, xv, lr, tok, ln_w, ln_b, *work, *p_init, reset_arg, out, *ckpt, *sizes,
        SAVE=save, OUT=not split, SEGMENTS=False, **consts,
    )
    if split:
        _mlp_fwd_kernel[(bh * d["n_ck"],)](
            xq, xk, xv, lr, tok, ln_w, ln_b, *segment_copies(ckpt), *p_init, reset_arg, out, *ckpt, *sizes,
            SAVE=False, OUT=True, SEGMENTS=True, **consts,
        )
    f = d["f"]
    W1, b1, W2, b2 = work
    return out, (W1[:, :, :f].contiguous(), b1, W2[..., :f].contiguous(), b2[..., :f].contiguous()), ckpt


def segment_copies(ckpt: tuple[Tensor, ...]) -> list[Tensor]:
    """A running state for each checkpoint segment, ``[B*H*NC, ...]``, starting as a copy of its checkpoint (the
    kernels that walk the segments in parallel update it in place)."""
    return [c.reshape(-1, *c.shape[2:]).clone() for c in ckpt]


def mlp_backward(
    xq: Tensor, xk: Tensor, xv: Tensor, lr: Tensor, tok: Tensor, ln_w: Tensor, ln_b: Tensor,
    init_state: tuple[Tensor, ...], reset: Tensor | None, ckpt: tuple[Tensor, ...],
    dout: Tensor, dfinal: tuple[Tensor, ...], config: MLPConfig = DEFAULT_CONFIG,
) -> dict[str, Tensor]:
    """Run the TTT-MLP backward kernel (checkpoints from :func:`mlp_forward` with the same ``config``).

    Returns per-token grads, ``tok``/``ln_w``/``ln_b`` grads reduced over batch (and heads for ``tok``),
    ``state`` (the start state's gradient, 4 tensors ``[B,H,...]``) and ``reset`` (reset-point contributions to
    the initial state, 4 tensors ``[H,...]``, zero without ``reset``)."""
    every = config.every
    d = _dims(xq, tok, config)
    fp, hid, bh, f = d["fp"], d["hid"], d["bsz"] * d["heads"], d["f"]
    f32 = dict(device=xq.device, dtype=torch.float32)
    p_init = _padded_init(init_state, fp)
    scratch = (torch.empty(bh, every, fp, hid, **f32), torch.empty(bh, every, hid, **f32),
               torch.empty(bh, every, hid, fp, **f32), torch.empty(bh, every, fp, **f32))
    carried = _carried_buffers(dfinal, d)
    dz1 = torch.empty(bh, d["bk"], hid, **f32)
    has_reset = reset is not None
    di = _reset_buffers(carried, has_reset)
    dxq, dxk, dxv, dlr = torch.empty_like(xq), torch.empty_like(xk), torch.empty_like(xv), torch.empty_like(lr)
    dtok = torch.empty(bh, d["bk"], **f32)
    dlnw = torch.empty(d["bsz"], d["heads"], f, **f32)
    dlnb = torch.empty(d["bsz"], d["heads"], f, **f32)
    dt, prec, emu = dot_config(xq.dtype, config.lowp)
    _mlp_bwd_kernel[(bh,)](
        xq, xk, xv, lr, tok, ln_w, ln_b, *p_init, reset if has_reset else tok, *ckpt, *scratch,
        *carried, dz1, *di, dout, dxq, dxk, dxv, dlr, dtok, dlnw, dlnb,
        d["seq"], d["n_mb"], d["n_ck"], d["heads"],
        F=f, FP=fp, HID=hid, HC=d["hc"], BK=d["bk"], K=d["k"], C=every, HAS_RESET=has_reset,
        DT=dt, PREC=prec, EMU=emu, **_opts(config.bwd_warps, config.bwd_stages),
    )
    return {
        "xq": dxq, "xk": dxk, "xv": dxv, "lr": dlr,
        "tok": dtok[:, : d["k"]].sum(0).to(tok.dtype),
        "ln_w": dlnw.sum(0).to(ln_w.dtype), "ln_b": dlnb.sum(0).to(ln_b.dtype),
        **_state_grads(carried, di, d),
    }


def _carried_buffers(dfinal: tuple[Tensor, ...], d: dict[str, int]) -> tuple[Tensor, ...]:
    """The carried state gradient as the backward kernels keep it: W1, b1 and W2 in two ping-pong slots
    ``[B*H, 2, ...]`` (slot 0 holds ``dfinal``), b2 in one ``[B*H, FP]``; padded and fp32."""
    bh, f, fp, hid = d["bsz"] * d["heads"], d["f"], d["fp"], d["hid"]
    dW1, db1, dW2, db2 = dfinal
    g1 = torch.zeros(bh, 2, fp, hid, device=dW1.device, dtype=torch.float32)
    g1[:, 0, :f] = dW1.reshape(bh, f, hid)
    gb1 = g1.new_zeros(bh, 2, hid)
    gb1[:, 0] = db1.reshape(bh, hid)
    g2 = g1.new_zeros(bh, 2, hid, fp)
    g2[:, 0, :, :f] = dW2.reshape(bh, hid, f)
    gb2 = _padded(db2.reshape(bh, f), fp, (1,))
    return g1, gb1, g2, gb2


def _reset_buffers(carried: tuple[Tensor, ...], has_reset: bool) -> tuple[Tensor, ...]:
    """Where the kernels add the gradient of each reset state (per program; empty without resets)."""
    g1, gb1, g2, gb2 = carried
    return tuple(torch.zeros_like(x[:, 0]) if has_reset else x[:, :0] for x in (g1, gb1, g2)) + (
        torch.zeros_like(gb2) if has_reset else gb2[:, :0],)


def _state_grads(carried: tuple[Tensor, ...], di: tuple[Tensor, ...], d: dict[str, int]) -> dict[str, tuple]:
    """``state`` (the start state's gradient, from the slot the last mini-batch wrote) and ``reset`` (the reset
    points' gradient of the initial state, summed over the batch), unpadded."""
    g1, gb1, g2, gb2 = carried
    f, hid = d["f"], d["hid"]
    cur = d["n_mb"] % 2
    shape = (d["bsz"], d["heads"])
    state = tuple(x.contiguous() for x in (  # contiguous, as the op's fake (meta) outputs promise torch.compile
        g1[:, cur, :f].reshape(*shape, f, hid), gb1[:, cur].reshape(*shape, hid),
        g2[:, cur, :, :f].reshape(*shape, hid, f), gb2[:, :f].reshape(*shape, f)))
    if di[0].shape[1]:
        rst = (di[0][:, :f].reshape(*shape, f, hid).sum(0), di[1].reshape(*shape, hid).sum(0),
               di[2][..., :f].reshape(*shape, hid, f).sum(0), di[3][:, :f].reshape(*shape, f).sum(0))
    else:
        rst = tuple(torch.zeros_like(s[0]) for s in state)
    return {"state": state, "reset": rst}
