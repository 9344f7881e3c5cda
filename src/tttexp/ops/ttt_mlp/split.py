"""TTT-MLP backward split into a parallel output path and a shorter serial chain (``MLPConfig.split_bwd``).

The one-kernel backward (:mod:`tttexp.ops.ttt_mlp.triton`) walks each (batch, head)'s mini-batches backwards in
one program, about 35 small dots per hidden chunk and mini-batch, all of them on the serial path. Most of them do
not depend on the carried state gradient ``D = (dW1n, db1n, dW2n, db2n)``: ``D`` enters a mini-batch only through
``q1 = Xk dW1n + db1n``, ``q2 = X2 dW2n + db2n``, ``Lg1 dW1n^T`` and ``Lg2 dW2n^T``. Everything that reads ``Xq`` or
``dout`` (``dZ2bar``, ``dZ1bar``, ``dXq``, the ``dM`` terms and the local parts of ``dLg1``, ``dLg2``, ``dX2`` and
``dXk``) is independent of ``D``. So the backward runs as two kernels:

1. **local**, one program per (batch, head, checkpoint segment), all in parallel: from the segment's checkpoint it
   walks the segment forwards, writes every mini-batch's start state, forms the output path and writes it to
   per-mini-batch tiles (``X2bar``, ``dZ1bar``, the local ``dLg1`` and ``dX2`` as ``[BK, 4F]``; ``dZ2bar``, the
   local ``dLg2`` and ``dXk`` as ``[BK, F]``), and ``dXq`` whole;
2. **chain**, one program per (batch, head): per mini-batch, backwards, it reads the start state, forms ``Z2``,
   ``G2`` and the four products with ``D``, goes back through ``G1 = (G2 W2^T) * s'(Z1)`` and the LayerNorm-L2
   gradient, and accumulates ``D`` with the local tiles' outer products. It recomputes no state.

The chain uses the stored weights and ``X2bar`` only as dot operands, so for bf16 inputs they are stored in bf16:
half the bytes, the same results. In the sm_90 build (head dim 64, bf16, 8 warps) the chain has 44 MMA
instructions against the one-kernel backward's 105 (which also recomputes each segment's states), and 144 B of
spill stores a thread against 964.

The math is :func:`tttexp.ops.ttt_mlp.math.mlp_step_bwd`, regrouped; the tests compare both kernels with the
float64 reference. Memory while the backward runs, at 8 x 2048 tokens, 12 heads of 64, mini-batch 16: 1.8 GB for
bf16 inputs (the states 0.8 GB, the tiles 0.8 GB, each segment's fp32 running state 0.2 GB), 2.8 GB for fp32;
twice that at 1 x 32768. The one-kernel backward keeps ``every`` states per (batch, head).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from tttexp.ops.triton_utils import dot_config, gelu, gelu_grad, gelu_parts, ln_rows, ln_rows_bwd, mm
from tttexp.ops.ttt_mlp.triton import (
    DEFAULT_CONFIG,
    MLPConfig,
    _carried_buffers,
    _copy_state,
    _dims,
    _lnl2,
    _minibatch,
    _opts,
    _padded_init,
    _reset_buffers,
    _reset_grad,
    _slots,
    _state_grads,
    _store_sums,
    _tiles,
    _z2,
    _z2_bwd,
    segment_copies,
)


@triton.jit
def _mlp_bwd_local_kernel(
    xq_ptr, xk_ptr, xv_ptr, lr_ptr, tok_ptr, lnw_ptr, lnb_ptr, w10_ptr, b10_ptr, w20_ptr, b20_ptr, reset_ptr,
    wk1_ptr, wkb1_ptr, wk2_ptr, wkb2_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, dout_ptr, dxq_ptr,
    x2bar_ptr, dz1bar_ptr, dlg1_ptr, dx2_ptr, dz2bar_ptr, dlg2_ptr, dxkl_ptr, dtok_ptr, dlnw_ptr, dlnb_ptr,
    T, N, NC, H,
    F: tl.constexpr, FP: tl.constexpr, HID: tl.constexpr, HC: tl.constexpr, BK: tl.constexpr, K: tl.constexpr,
    C: tl.constexpr, HAS_RESET: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, EMU: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # (batch, head, segment)
    seg = pid % NC
    bh = pid // NC
    h = bh % H
    bi = bh // H
    rows, cols, hcols, cmask, w1_off, w2_off, z_off = _tiles(F, FP, HID, HC, BK)
    y_off = rows[:, None] * FP + cols[None, :]
    S1: tl.constexpr = FP * HID
    gw = tl.load(lnw_ptr + h * F + cols, mask=cmask, other=0.0).to(tl.float32)
    gb = tl.load(lnb_ptr + h * F + cols, mask=cmask, other=0.0).to(tl.float32)
    dtok = tl.zeros([BK], dtype=tl.float32)
    dgw = tl.zeros([FP], dtype=tl.float32)
    dgb = tl.zeros([FP], dtype=tl.float32)
    causal = rows[None, :] <= rows[:, None]
    n0 = seg * C
    n1 = tl.minimum(n0 + C, N)
    # the running state, fp32, starts as the segment's checkpoint; a copy of each mini-batch's start state (the
    # weights in the stored dtype) goes to slot bh * N + n for the chain
    p1 = wk1_ptr + pid * S1
    pb1 = wkb1_ptr + pid * HID
    p2 = wk2_ptr + pid * S1
    _copy_state(p1, pb1, p2, wkb2_ptr + pid * FP, w1_ptr + (bh * N + n0) * S1, b1_ptr + (bh * N + n0) * HID,
                w2_ptr + (bh * N + n0) * S1, b2_ptr + (bh * N + n0) * FP, w1_off, w2_off, hcols, cols, FP, HID, HC)
    b2 = tl.load(wkb2_ptr + pid * FP + cols)
    for n in range(n0, n1):
        sl = bh * N + n
        if HAS_RESET:  # noqa: SIM102 (constexpr guard first)
            if tl.load(reset_ptr + bi * N + n) != 0:
                _copy_state(w10_ptr + h * S1, b10_ptr + h * HID, w20_ptr + h * S1, b20_ptr + h * FP,
                            p1, pb1, p2, wkb2_ptr + pid * FP, w1_off, w2_off, hcols, cols, FP, HID, HC)
                _copy_state(w10_ptr + h * S1, b10_ptr + h * HID, w20_ptr + h * S1, b20_ptr + h * FP,
                            w1_ptr + sl * S1, b1_ptr + sl * HID, w2_ptr + sl * S1, b2_ptr + sl * FP,
                            w1_off, w2_off, hcols, cols, FP, HID, HC)
                b2 = tl.load(b20_ptr + h * FP + cols)
                tl.debug_barrier()
        x_off, xmsk, lr_off, rmask, m, xq, xk, xv, eta, t, t_last = _minibatch(
            xq_ptr, xk_ptr, xv_ptr, lr_ptr, tok_ptr, bh, n, T, rows, cols, cmask, F, K)
        dout = tl.load(dout_ptr + x_off, mask=xmsk, other=0.0).to(tl.float32)
        st = sl  # this mini-batch's tiles
        # the forward: Z2, G2, then Z2bar by the dual form
        z2 = _z2(xk, p1, pb1, p2, b2, w1_off, w2_off, hcols, FP, HID, HC, BK, DT, PREC, EMU)
        g2, lg2, xh, rstd, gx, e = _lnl2(z2, xk, xv, eta, gw, gb, cmask, F)
        s1 = mm(xq, tl.trans(xk), DT, PREC, EMU) + 1.0
        m1 = tl.where(causal, t[:, None] * s1, 0.0)
        acc = tl.zeros([BK, FP], dtype=tl.float32)
        s2 = tl.zeros([BK, BK], dtype=tl.float32)
        for c0 in range(0, HID, HC):
            w1c = tl.load(p1 + c0 + w1_off)
            b1c = tl.load(pb1 + c0 + hcols)
            w2c = tl.load(p2 + c0 * FP + w2_off)
            z1c = mm(xk, w1c, DT, PREC, EMU) + b1c[None, :]
            lg1c = eta[:, None] * mm(g2, tl.trans(w2c), DT, PREC, EMU) * gelu_grad(z1c)
            x2bar = gelu(mm(xq, w1c, DT, PREC, EMU) + b1c[None, :] - mm(m1, lg1c, DT, PREC, EMU))
            acc += mm(x2bar, w2c, DT, PREC, EMU)
            s2 += mm(x2bar, tl.trans(gelu(z1c)), DT, PREC, EMU)
        s2 += 1.0
        m2 = tl.where(causal, t[:, None] * s2, 0.0)
        z2bar = acc + b2[None, :] - mm(m2, lg2, DT, PREC, EMU)
        # the output path: out = Xq + LN(Z2bar), back to Xq and to the local parts of dLg2, dLg1, dX2, dXk
        xh2, rstd2 = ln_rows(z2bar, cmask, F)
        dgw += tl.sum(dout * xh2, 0)
        dgb += tl.sum(dout, 0)
        dz2bar = ln_rows_bwd(dout * gw[None, :], xh2, rstd2, cmask, F)
        dm2 = tl.where(causal, -mm(dz2bar, tl.trans(lg2), DT, PREC, EMU), 0.0)
        dtok += tl.sum(dm2 * s2, 1)
        ds2 = dm2 * t[:, None]
        tl.store(dz2bar_ptr + st * BK * FP + y_off, dz2bar)
        tl.store(dlg2_ptr + st * BK * FP + y_off, -mm(tl.trans(m2), dz2bar, DT, PREC, EMU))
        dxq = dout
        dm1 = tl.zeros([BK, BK], dtype=tl.float32)
        last = n == n1 - 1  # the next segment's program writes the state after its segment's last mini-batch
        tl.debug_barrier()  # every read of the running state above before the loop below rewrites it
        for c0 in range(0, HID, HC):
            w1c = tl.load(p1 + c0 + w1_off)
            b1c = tl.load(pb1 + c0 + hcols)
            w2c = tl.load(p2 + c0 * FP + w2_off)
            z1c = mm(xk, w1c, DT, PREC, EMU) + b1c[None, :]
            x2c = gelu(z1c)
            lg1c = eta[:, None] * mm(g2, tl.trans(w2c), DT, PREC, EMU) * gelu_grad(z1c)
            x2bar, ds1bar, _ = gelu_parts(mm(xq, w1c, DT, PREC, EMU) + b1c[None, :] - mm(m1, lg1c, DT, PREC, EMU))
            dz1bar = (mm(dz2bar, tl.trans(w2c), DT, PREC, EMU) + mm(ds2, x2c, DT, PREC, EMU)) * ds1bar
            dxq += mm(dz1bar, tl.trans(w1c), DT, PREC, EMU)
            dm1 -= mm(dz1bar, tl.trans(lg1c), DT, PREC, EMU)
            o = st * BK * HID + c0 + z_off
            tl.store(x2bar_ptr + o, x2bar.to(x2bar_ptr.dtype.element_ty))
            tl.store(dz1bar_ptr + o, dz1bar)
            tl.store(dlg1_ptr + o, -mm(tl.trans(m1), dz1bar, DT, PREC, EMU))
            tl.store(dx2_ptr + o, mm(tl.trans(ds2), x2bar, DT, PREC, EMU))
            if not last:  # the state after this mini-batch: the running one (same threads, same layout as the
                # loads above) and its copy in the next slot
                w1n = w1c - t_last * mm(tl.trans(xk), lg1c, DT, PREC, EMU)
                b1n = b1c - t_last * tl.sum(lg1c, 0)
                w2n = w2c - t_last * mm(tl.trans(x2c), lg2, DT, PREC, EMU)
                tl.store(p1 + c0 + w1_off, w1n)
                tl.store(pb1 + c0 + hcols, b1n)
                tl.store(p2 + c0 * FP + w2_off, w2n)
                tl.store(w1_ptr + (sl + 1) * S1 + c0 + w1_off, w1n.to(w1_ptr.dtype.element_ty))
                tl.store(b1_ptr + (sl + 1) * HID + c0 + hcols, b1n)
                tl.store(w2_ptr + (sl + 1) * S1 + c0 * FP + w2_off, w2n.to(w2_ptr.dtype.element_ty))
        dm1 = tl.where(causal, dm1, 0.0)
        dtok += tl.sum(dm1 * s1, 1)
        ds1m = dm1 * t[:, None]
        dxq += mm(ds1m, xk, DT, PREC, EMU)
        tl.store(dxkl_ptr + st * BK * FP + y_off, mm(tl.trans(ds1m), xq, DT, PREC, EMU))
        tl.store(dxq_ptr + x_off, dxq.to(dxq_ptr.dtype.element_ty), mask=xmsk)
        b2 = b2 - t_last * tl.sum(lg2, 0)
        if not last:
            tl.store(b2_ptr + (sl + 1) * FP + cols, b2)
        tl.debug_barrier()
    _store_sums(dtok_ptr, dlnw_ptr, dlnb_ptr, pid, dtok, dgw, dgb, rows, cols, cmask, F, BK)


@triton.jit
def _mlp_bwd_chain_kernel(
    xq_ptr, xk_ptr, xv_ptr, lr_ptr, tok_ptr, lnw_ptr, lnb_ptr, w10_ptr, b10_ptr, w20_ptr, b20_ptr, reset_ptr,
    w1_ptr, b1_ptr, w2_ptr, b2_ptr,
    g1_ptr, gb1_ptr, g2_ptr, gb2_ptr, dz1_ptr, di1_ptr, dib1_ptr, di2_ptr, dib2_ptr,
    x2bar_ptr, dz1bar_ptr, dlg1_ptr, dx2_ptr, dz2bar_ptr, dlg2_ptr, dxkl_ptr,
    dxk_ptr, dxv_ptr, dlr_ptr, dtok_ptr, dlnw_ptr, dlnb_ptr,
    T, N, H,
    F: tl.constexpr, FP: tl.constexpr, HID: tl.constexpr, HC: tl.constexpr, BK: tl.constexpr, K: tl.constexpr,
    HAS_RESET: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, EMU: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    h = pid % H
    bi = pid // H
    rows, cols, hcols, cmask, w1_off, w2_off, z_off = _tiles(F, FP, HID, HC, BK)
    y_off = rows[:, None] * FP + cols[None, :]
    S1: tl.constexpr = FP * HID
    gw = tl.load(lnw_ptr + h * F + cols, mask=cmask, other=0.0).to(tl.float32)
    gb = tl.load(lnb_ptr + h * F + cols, mask=cmask, other=0.0).to(tl.float32)
    db2 = tl.load(gb2_ptr + pid * FP + cols)
    dtok = tl.zeros([BK], dtype=tl.float32)
    dgw = tl.zeros([FP], dtype=tl.float32)
    dgb = tl.zeros([FP], dtype=tl.float32)
    cur = 0  # ping-pong slot of the carried state gradient
    for i in range(N):
        n = N - 1 - i
        st = pid * N + n  # this mini-batch's start state and tiles
        p1 = w1_ptr + st * S1
        pb1 = b1_ptr + st * HID
        p2 = w2_ptr + st * S1
        b2 = tl.load(b2_ptr + st * FP + cols)
        dn1, dnb1, dn2, dw1, dwb1, dw2 = _slots(g1_ptr, gb1_ptr, g2_ptr, pid, cur, S1, HID)
        x_off, xmsk, lr_off, rmask, m, xq, xk, xv, eta, t, t_last = _minibatch(
            xq_ptr, xk_ptr, xv_ptr, lr_ptr, tok_ptr, pid, n, T, rows, cols, cmask, F, K)
        # Z2 and G2; q2 = X2 dW2n + db2n
        z2 = tl.zeros([BK, FP], dtype=tl.float32) + b2[None, :]
        q2 = tl.zeros([BK, FP], dtype=tl.float32) + db2[None, :]
        for c0 in range(0, HID, HC):
            x2c = gelu(mm(xk, tl.load(p1 + c0 + w1_off), DT, PREC, EMU) + tl.load(pb1 + c0 + hcols)[None, :])
            z2 += mm(x2c, tl.load(p2 + c0 * FP + w2_off), DT, PREC, EMU)
            q2 += mm(x2c, tl.load(dn2 + c0 * FP + w2_off), DT, PREC, EMU)
        g2, lg2, xh, rstd, gx, e = _lnl2(z2, xk, xv, eta, gw, gb, cmask, F)
        dz2bar = tl.load(dz2bar_ptr + st * BK * FP + y_off)
        dlg2 = tl.load(dlg2_ptr + st * BK * FP + y_off) - t_last * q2
        dt_last = -tl.sum(tl.sum(q2 * lg2, 1), 0)
        dlr = tl.sum(dlg2 * g2, 1)
        dg2 = eta[:, None] * dlg2
        db2 = db2 + tl.sum(dz2bar, 0)
        dxk = tl.load(dxkl_ptr + st * BK * FP + y_off)
        # G1 = (G2 W2^T) * s'(Z1) and Lg1 = eta G1 back to G2, the first layer's part of dZ1, and D
        for c0 in range(0, HID, HC):
            w1c = tl.load(p1 + c0 + w1_off)
            b1c = tl.load(pb1 + c0 + hcols)
            w2c = tl.load(p2 + c0 * FP + w2_off)
            dn1c = tl.load(dn1 + c0 + w1_off)
            dnb1c = tl.load(dnb1 + c0 + hcols)
            dn2c = tl.load(dn2 + c0 * FP + w2_off)
            o = st * BK * HID + c0 + z_off
            _, ds1c, dds1c = gelu_parts(mm(xk, w1c, DT, PREC, EMU) + b1c[None, :])
            pc = mm(g2, tl.trans(w2c), DT, PREC, EMU)
            g1c = pc * ds1c
            lg1c = eta[:, None] * g1c
            q1c = mm(xk, dn1c, DT, PREC, EMU) + dnb1c[None, :]
            dlg1c = tl.load(dlg1_ptr + o) - t_last * q1c
            dt_last -= tl.sum(tl.sum(q1c * lg1c, 1), 0)
            dxk -= t_last * mm(lg1c, tl.trans(dn1c), DT, PREC, EMU)
            dlr += tl.sum(dlg1c * g1c, 1)
            dpc = eta[:, None] * dlg1c * ds1c
            dx2p = tl.load(dx2_ptr + o) - t_last * mm(lg2, tl.trans(dn2c), DT, PREC, EMU)
            tl.store(dz1_ptr + pid * BK * HID + c0 + z_off, eta[:, None] * dlg1c * pc * dds1c + dx2p * ds1c)
            dg2 += mm(dpc, w2c, DT, PREC, EMU)
            tl.store(dw2 + c0 * FP + w2_off, dn2c + mm(tl.trans(tl.load(x2bar_ptr + o)), dz2bar, DT, PREC, EMU)
                     + mm(tl.trans(dpc), g2, DT, PREC, EMU))
            dz1bar = tl.load(dz1bar_ptr + o)
            tl.store(dw1 + c0 + w1_off, dn1c + mm(tl.trans(xq), dz1bar, DT, PREC, EMU))
            tl.store(dwb1 + c0 + hcols, dnb1c + tl.sum(dz1bar, 0))
        dtok += tl.where(rows == m - 1, dt_last, 0.0)
        dxk, dxv, dgw, dgb, db2 = _z2_bwd(dg2, xh, rstd, gx, e, gw, cmask, dxk, dgw, dgb, db2, xk, p1, pb1, p2,
                                          dz1_ptr + pid * BK * HID, dw1, dwb1, dw2, w1_off, w2_off, z_off, hcols,
                                          F, FP, HID, HC, BK, DT, PREC, EMU)
        tl.store(dxk_ptr + x_off, dxk.to(dxk_ptr.dtype.element_ty), mask=xmsk)
        tl.store(dxv_ptr + x_off, dxv.to(dxv_ptr.dtype.element_ty), mask=xmsk)
        tl.store(dlr_ptr + lr_off, dlr.to(dlr_ptr.dtype.element_ty), mask=rmask)
        tl.debug_barrier()
        db2 = _reset_grad(reset_ptr, bi, N, n, di1_ptr, dib1_ptr, di2_ptr, dib2_ptr, dw1, dwb1, dw2, db2, pid,
                          w1_off, w2_off, hcols, cols, FP, HID, HC, HAS_RESET)
        cur = 1 - cur
    tl.store(gb2_ptr + pid * FP + cols, db2)
    _store_sums(dtok_ptr, dlnw_ptr, dlnb_ptr, pid, dtok, dgw, dgb, rows, cols, cmask, F, BK)


def mlp_backward_split(
    xq: Tensor, xk: Tensor, xv: Tensor, lr: Tensor, tok: Tensor, ln_w: Tensor, ln_b: Tensor,
    init_state: tuple[Tensor, ...], reset: Tensor | None, ckpt: tuple[Tensor, ...],
    dout: Tensor, dfinal: tuple[Tensor, ...], config: MLPConfig = DEFAULT_CONFIG,
) -> dict[str, Tensor]:
    """:func:`tttexp.ops.ttt_mlp.triton.mlp_backward`'s gradients, from the local kernel and then the chain."""
    d = _dims(xq, tok, config)
    bsz, heads, fp, hid, f, bk, k = d["bsz"], d["heads"], d["fp"], d["hid"], d["f"], d["bk"], d["k"]
    bh, n_mb, nc = bsz * heads, d["n_mb"], d["n_ck"]
    f32 = dict(device=xq.device, dtype=torch.float32)
    p_init = _padded_init(init_state, fp)
    has_reset = reset is not None
    reset_arg = reset if has_reset else tok
    dt, prec, emu = dot_config(xq.dtype, config.lowp)
    consts = dict(F=f, FP=fp, HID=hid, HC=d["hc"], BK=bk, K=k, HAS_RESET=has_reset, DT=dt, PREC=prec, EMU=emu)

    # The start state of every mini-batch, which the local kernel writes and the chain reads. The chain uses the
    # weights only as dot operands, so they are kept in the dots' dtype (bf16 inputs: half the bytes, the same
    # results); so is X2bar. Each segment's running state stays fp32 (a copy of its checkpoint).
    low = torch.float32 if dt == tl.float32 else xq.dtype
    work = segment_copies(ckpt)
    states = (torch.empty(bh * n_mb, fp, hid, device=xq.device, dtype=low), torch.empty(bh * n_mb, hid, **f32),
              torch.empty(bh * n_mb, hid, fp, device=xq.device, dtype=low), torch.empty(bh * n_mb, fp, **f32))
    x2bar = torch.empty(bh, n_mb, bk, hid, device=xq.device, dtype=low)
    wide = torch.empty(3, bh, n_mb, bk, hid, **f32)  # dZ1bar, local dLg1, local dX2
    narrow = torch.empty(3, bh, n_mb, bk, fp, **f32)  # dZ2bar, local dLg2, local dXk
    dxq = torch.empty_like(xq)
    local_tok = torch.empty(bh * nc, bk, **f32)
    local_lnw = torch.empty(bh * nc, f, **f32)
    local_lnb = torch.empty(bh * nc, f, **f32)
    _mlp_bwd_local_kernel[(bh * nc,)](
        xq, xk, xv, lr, tok, ln_w, ln_b, *p_init, reset_arg, *work, *states, dout, dxq, x2bar, *wide, *narrow,
        local_tok, local_lnw, local_lnb, d["seq"], n_mb, nc, heads, C=config.every, **consts,
        **_opts(config.local_warps or config.bwd_warps, config.bwd_stages),
    )
    del work

    carried = _carried_buffers(dfinal, d)
    di = _reset_buffers(carried, has_reset)
    dz1 = torch.empty(bh, bk, hid, **f32)
    dxk, dxv, dlr = torch.empty_like(xk), torch.empty_like(xv), torch.empty_like(lr)
    dtok = torch.empty(bh, bk, **f32)
    dlnw = torch.empty(bsz, heads, f, **f32)
    dlnb = torch.empty(bsz, heads, f, **f32)
    _mlp_bwd_chain_kernel[(bh,)](
        xq, xk, xv, lr, tok, ln_w, ln_b, *p_init, reset_arg, *states, *carried, dz1, *di,
        x2bar, *wide, *narrow, dxk, dxv, dlr, dtok, dlnw, dlnb, d["seq"], n_mb, heads, **consts,
        **_opts(config.bwd_warps, config.bwd_stages),
    )

    def per_head(local: Tensor) -> Tensor:
        return local.reshape(bsz, heads, nc, f).sum((0, 2))

    return {
        "xq": dxq, "xk": dxk, "xv": dxv, "lr": dlr,
        "tok": (dtok[:, :k].sum(0) + local_tok[:, :k].sum(0)).to(tok.dtype),
        "ln_w": (dlnw.sum(0) + per_head(local_lnw)).to(ln_w.dtype),
        "ln_b": (dlnb.sum(0) + per_head(local_lnb)).to(ln_b.dtype),
        **_state_grads(carried, di, d),
    }
