"""Triton kernels for the TTT-Linear inner loop: forward and hand-derived backward over a whole sequence.

Forward: one program per (batch, head) walks the mini-batches in order with ``W [F, F]`` and ``b [F]`` held on chip
in fp32. Without gradients it writes the outputs and the final state in that one pass. For training it runs only the
state chain (two dots a step) and saves a checkpoint every ``C`` mini-batches; a second launch then computes the
outputs of every checkpoint segment in parallel, which keeps the GPU busy when batch x heads is small.

Backward, in three launches. Only ``dL/dW``, ``dL/db`` must travel backwards through every step; everything else
about a step depends on its own start state and the upstream gradient of its outputs. So (1) one program per
checkpoint segment recomputes the segment's states from its checkpoint and stores each step's pieces (the
normalised inner prediction, ``Lg``, the output-path gradient ``dZbar``...) in fp32 tiles; (2) one
program per (batch, head) runs the reverse chain over all steps, which is now only a few ``BK x F`` by ``F x F`` dots
per step, and stores per step what the later steps send back (``Xk dW' + db'`` and ``Lg dW'^T``); (3) the segments
run in parallel again and turn those into every gradient. The chain is the only sequential part and it is short, so
long sequences with few (batch, head) pairs no longer leave the GPU idle. The math is
:mod:`tttexp.ops.ttt_linear.math` (checked against autograd of the reference in float64).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from tttexp.ops.settings import LinearConfig
from tttexp.ops.triton_utils import dot_config, ln_rows, ln_rows_bwd, mm, padded_dim

DEFAULT_CONFIG = LinearConfig()


def _launch_opts(config: LinearConfig, kind: str, fp: int, dtype: torch.dtype) -> dict[str, int]:
    opts = {"num_warps": getattr(config, f"{kind}_warps") or (4 if fp <= 64 else 8)}
    stages = config.fwd_stages if kind == "fwd" else config.bwd_stages
    if stages:
        opts["num_stages"] = stages
    elif kind != "fwd" and fp > 64 and dtype == torch.float32:
        opts["num_stages"] = 1
    return opts


@triton.jit
def _load_rows(ptr, base, start, rows, cols, rmask, cmask, F: tl.constexpr):
    off = base + (start + rows)[:, None] * F + cols[None, :]
    return tl.load(ptr + off, mask=rmask[:, None] & cmask[None, :], other=0.0)


@triton.jit
def _inner_grad(xk, xv, W, b, gw, gb, cmask, F: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
                EMU: tl.constexpr):
    """G = d/dZ 0.5||LN(Z) - (Xv - Xk)||^2 at Z = Xk W + b, with the pieces the backward reuses."""
    z = mm(xk, W, DT, PREC, EMU) + b[None, :]
    xh, rstd = ln_rows(z, cmask, F)
    g, e, gx = _inner_grad_at(xh, rstd, xk, xv, gw, gb, cmask, F)
    return g, xh, rstd, e, gx


@triton.jit
def _inner_grad_at(xh, rstd, xk, xv, gw, gb, cmask, F: tl.constexpr):
    """G and its pieces ``e``, ``gx`` from Z's normalised rows ``xh`` and ``rstd``."""
    e = xh * gw[None, :] + gb[None, :] - (xv.to(tl.float32) - xk.to(tl.float32))
    gx = e * gw[None, :]
    return ln_rows_bwd(gx, xh, rstd, cmask, F), e, gx


@triton.jit
def _linear_fwd_kernel(
    xq_ptr, xk_ptr, xv_ptr, lr_ptr, tok_ptr, lnw_ptr, lnb_ptr, w0_ptr, b0_ptr, ws_ptr, bs_ptr, reset_ptr,
    out_ptr, wf_ptr, bf_ptr, ckw_ptr, ckb_ptr,
    T, N, NC, H,
    F: tl.constexpr, FP: tl.constexpr, BK: tl.constexpr, K: tl.constexpr, C: tl.constexpr,
    HAS_STATE: tl.constexpr, HAS_RESET: tl.constexpr, SAVE: tl.constexpr, OUTPUT: tl.constexpr,
    SEGMENT: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, EMU: tl.constexpr,
):
    """Three uses. Whole sequence per (batch, head) with outputs (``OUTPUT``, not ``SEGMENT``); the state chain
    alone (neither), which only updates ``W``, ``b`` and saves checkpoints, two dots a step; or the outputs of one
    checkpoint segment per program starting from its checkpoint (``SEGMENT``), all segments in parallel."""
    pid = tl.program_id(0).to(tl.int64)
    if SEGMENT:
        seg = pid % NC
        bh = pid // NC
        n0 = seg * C
        n1 = tl.minimum(n0 + C, N)
    else:
        bh = pid
        n0 = 0
        n1 = N
    h = bh % H
    bi = bh // H
    rows = tl.arange(0, BK)
    cols = tl.arange(0, FP)
    cmask = cols < F
    w_off = cols[:, None] * F + cols[None, :]
    w_msk = cmask[:, None] & cmask[None, :]
    wp_off = cols[:, None] * FP + cols[None, :]
    if SEGMENT:
        W = tl.load(ckw_ptr + pid * FP * FP + wp_off)
        b = tl.load(ckb_ptr + pid * FP + cols)
    elif HAS_STATE:
        W = tl.load(ws_ptr + bh * F * F + w_off, mask=w_msk, other=0.0).to(tl.float32)
        b = tl.load(bs_ptr + bh * F + cols, mask=cmask, other=0.0).to(tl.float32)
    else:
        W = tl.load(w0_ptr + h * F * F + w_off, mask=w_msk, other=0.0).to(tl.float32)
        b = tl.load(b0_ptr + h * F + cols, mask=cmask, other=0.0).to(tl.float32)
    gw = tl.load(lnw_ptr + h * F + cols, mask=cmask, other=0.0).to(tl.float32)
    gb = tl.load(lnb_ptr + h * F + cols, mask=cmask, other=0.0).to(tl.float32)
    x_base = bh * T * F
    causal = rows[None, :] <= rows[:, None]
    for n in range(n0, n1):
        start = n * K
        m = tl.minimum(T - start, K)
        if SAVE:  # noqa: SIM102 (constexpr guard first)
            if n % C == 0:
                ck = bh * NC + n // C
                tl.store(ckw_ptr + ck * FP * FP + wp_off, W)
                tl.store(ckb_ptr + ck * FP + cols, b)
        if HAS_RESET:  # noqa: SIM102 (constexpr guard first)
            if tl.load(reset_ptr + bi * N + n) != 0:
                W = tl.load(w0_ptr + h * F * F + w_off, mask=w_msk, other=0.0).to(tl.float32)
                b = tl.load(b0_ptr + h * F + cols, mask=cmask, other=0.0).to(tl.float32)
        rmask = rows < m
        xk = _load_rows(xk_ptr, x_base, start, rows, cols, rmask, cmask, F)
        xv = _load_rows(xv_ptr, x_base, start, rows, cols, rmask, cmask, F)
        eta = tl.load(lr_ptr + bh * T + start + rows, mask=rmask, other=0.0).to(tl.float32)
        t_last = tl.load(tok_ptr + m - 1).to(tl.float32)
        g, xh1, rstd1, e, gx = _inner_grad(xk, xv, W, b, gw, gb, cmask, F, DT, PREC, EMU)
        lg = eta[:, None] * g
        if OUTPUT:
            xq = _load_rows(xq_ptr, x_base, start, rows, cols, rmask, cmask, F)
            t = tl.load(tok_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
            s = mm(xq, tl.trans(xk), DT, PREC, EMU)
            mmat = tl.where(causal, t[:, None] * (s + 1.0), 0.0)
            zbar = mm(xq, W, DT, PREC, EMU) + b[None, :] - mm(mmat, lg, DT, PREC, EMU)
            xh2, rstd2 = ln_rows(zbar, cmask, F)
            out = xq.to(tl.float32) + xh2 * gw[None, :] + gb[None, :]
            tl.store(out_ptr + x_base + (start + rows)[:, None] * F + cols[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])
        W = W - t_last * mm(tl.trans(xk), lg, DT, PREC, EMU)
        b = b - t_last * tl.sum(lg, 0)
    if not SEGMENT:
        tl.store(wf_ptr + bh * F * F + w_off, W, mask=w_msk)
        tl.store(bf_ptr + bh * F + cols, b, mask=cmask)


@triton.jit
def _linear_bwd_segment_kernel(
    xq_ptr, xk_ptr, xv_ptr, lr_ptr, tok_ptr, lnw_ptr, lnb_ptr, w0_ptr, b0_ptr, reset_ptr, ckw_ptr, ckb_ptr, dout_ptr,
    xh_ptr, lg_ptr, dlg_ptr, dzb_ptr, rstd_ptr, c_ptr, p_ptr, q_ptr,
    dxq_ptr, dxk_ptr, dxv_ptr, dlr_ptr, dtok_ptr, dlnw_ptr, dlnb_ptr,
    T, N, NC, H,
    F: tl.constexpr, FP: tl.constexpr, BK: tl.constexpr, K: tl.constexpr, C: tl.constexpr,
    HAS_RESET: tl.constexpr, FINISH: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, EMU: tl.constexpr,
    REUSE: tl.constexpr,
):
    """One checkpoint segment of one (batch, head): recompute its states forward from the checkpoint and, per step,
    either store what the reverse chain needs (``FINISH`` false) or, given the chain's ``p = Xk dW' + db'`` and
    ``q = Lg dW'^T``, every gradient of the step (``FINISH`` true). Segments run in parallel."""
    pid = tl.program_id(0).to(tl.int64)
    seg = pid % NC
    bh = pid // NC
    h = bh % H
    bi = bh // H
    rows = tl.arange(0, BK)
    cols = tl.arange(0, FP)
    cmask = cols < F
    w_off = cols[:, None] * F + cols[None, :]
    w_msk = cmask[:, None] & cmask[None, :]
    wp_off = cols[:, None] * FP + cols[None, :]
    tile_off = rows[:, None] * FP + cols[None, :]
    gw = tl.load(lnw_ptr + h * F + cols, mask=cmask, other=0.0).to(tl.float32)
    gb = tl.load(lnb_ptr + h * F + cols, mask=cmask, other=0.0).to(tl.float32)
    W = tl.load(ckw_ptr + (bh * NC + seg) * FP * FP + wp_off)
    b = tl.load(ckb_ptr + (bh * NC + seg) * FP + cols)
    dtok = tl.zeros([BK], dtype=tl.float32)
    if REUSE and FINISH:  # the first pass summed the post-norm's part
        dgw = tl.load(dlnw_ptr + pid * FP + cols)
        dgb = tl.load(dlnb_ptr + pid * FP + cols)
    else:
        dgw = tl.zeros([FP], dtype=tl.float32)
        dgb = tl.zeros([FP], dtype=tl.float32)
    x_base = bh * T * F
    causal = rows[None, :] <= rows[:, None]
    n0 = seg * C
    n1 = tl.minimum(n0 + C, N)
    for n in range(n0, n1):
        if HAS_RESET:  # noqa: SIM102 (constexpr guard first)
            if tl.load(reset_ptr + bi * N + n) != 0:
                W = tl.load(w0_ptr + h * F * F + w_off, mask=w_msk, other=0.0).to(tl.float32)
                b = tl.load(b0_ptr + h * F + cols, mask=cmask, other=0.0).to(tl.float32)
        start = n * K
        m = tl.minimum(T - start, K)
        rmask = rows < m
        xmsk = rmask[:, None] & cmask[None, :]
        x_off = x_base + (start + rows)[:, None] * F + cols[None, :]
        st = (bh * N + n) * BK
        xq = tl.load(xq_ptr + x_off, mask=xmsk, other=0.0)
        xk = tl.load(xk_ptr + x_off, mask=xmsk, other=0.0)
        xv = tl.load(xv_ptr + x_off, mask=xmsk, other=0.0)
        dout = tl.load(dout_ptr + x_off, mask=xmsk, other=0.0).to(tl.float32)
        eta = tl.load(lr_ptr + bh * T + start + rows, mask=rmask, other=0.0).to(tl.float32)
        t = tl.load(tok_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        t_last = tl.load(tok_ptr + m - 1).to(tl.float32)
        if REUSE and FINISH:  # what the first pass computed and stored, and what follows from it row by row
            xh1 = tl.load(xh_ptr + st * FP + tile_off)
            rstd1 = tl.load(rstd_ptr + st + rows)
            c = tl.load(c_ptr + st + rows)
            g, e, gx = _inner_grad_at(xh1, rstd1, xk, xv, gw, gb, cmask, F)
            lg = eta[:, None] * g
            dzbar = tl.load(dzb_ptr + st * FP + tile_off).to(tl.float32)
            dlg = tl.load(dlg_ptr + st * FP + tile_off)
            s1 = mm(xq, tl.trans(xk), DT, PREC, EMU) + 1.0
            mmat = tl.where(causal, t[:, None] * s1, 0.0)
        else:
            g, xh1, rstd1, e, gx = _inner_grad(xk, xv, W, b, gw, gb, cmask, F, DT, PREC, EMU)
            lg = eta[:, None] * g
            s1 = mm(xq, tl.trans(xk), DT, PREC, EMU) + 1.0
            mmat = tl.where(causal, t[:, None] * s1, 0.0)
            zbar = mm(xq, W, DT, PREC, EMU) + b[None, :] - mm(mmat, lg, DT, PREC, EMU)
            xh2, rstd2 = ln_rows(zbar, cmask, F)
            # out = xq + LN(zbar)
            dzbar = ln_rows_bwd(dout * gw[None, :], xh2, rstd2, cmask, F)
            # zbar = xq W + b - M lg: the part of dL/dlg that does not depend on later steps
            dlg = -mm(tl.trans(mmat), dzbar, DT, PREC, EMU)
            c = tl.sum(gx * xh1, 1) / F
            if REUSE:
                dgw += tl.sum(dout * xh2, 0)
                dgb += tl.sum(dout, 0)
        if FINISH:
            if not REUSE:
                dgw += tl.sum(dout * xh2, 0)
                dgb += tl.sum(dout, 0)
            p = tl.load(p_ptr + st * FP + tile_off).to(tl.float32)
            q = tl.load(q_ptr + st * FP + tile_off).to(tl.float32)
            dxq = dout + mm(dzbar, tl.trans(W), DT, PREC, EMU)
            dmm = tl.where(causal, -mm(dzbar, tl.trans(lg), DT, PREC, EMU), 0.0)
            dlg = dlg - t_last * p
            dt_last = -tl.sum(tl.sum(p * lg, 1), 0)
            dtok += tl.sum(dmm * s1, 1) + tl.where(rows == m - 1, dt_last, 0.0)
            ds = dmm * t[:, None]
            dxq += mm(ds, xk, DT, PREC, EMU)
            dxk = mm(tl.trans(ds), xq, DT, PREC, EMU) - t_last * q
            # lg = eta * g ; g = LN-L2 gradient at z = xk W + b
            tl.store(dlr_ptr + bh * T + start + rows, tl.sum(dlg * g, 1).to(dlr_ptr.dtype.element_ty), mask=rmask)
            dg = eta[:, None] * dlg
            a = tl.sum(gx, 1) / F
            dgx = ln_rows_bwd(dg, xh1, rstd1, cmask, F)
            dxh1 = (-rstd1[:, None] * (c[:, None] * dg + (tl.sum(dg * xh1, 1) / F)[:, None] * gx)
                    + dgx * (gw * gw)[None, :])
            drstd1 = tl.sum(dg * (gx - a[:, None] - xh1 * c[:, None]), 1)
            dgw += tl.sum(dgx * (e + gw[None, :] * xh1), 0)
            dgb += tl.sum(dgx * gw[None, :], 0)
            dxv = -dgx * gw[None, :]
            dxk += dgx * gw[None, :]
            dz = ln_rows_bwd(dxh1, xh1, rstd1, cmask, F) - (drstd1 * rstd1 * rstd1 / F)[:, None] * xh1
            dxk += mm(dz, tl.trans(W), DT, PREC, EMU)
            tl.store(dxq_ptr + x_off, dxq.to(dxq_ptr.dtype.element_ty), mask=xmsk)
            tl.store(dxk_ptr + x_off, dxk.to(dxk_ptr.dtype.element_ty), mask=xmsk)
            tl.store(dxv_ptr + x_off, dxv.to(dxv_ptr.dtype.element_ty), mask=xmsk)
        else:
            tl.store(xh_ptr + st * FP + tile_off, xh1)
            tl.store(lg_ptr + st * FP + tile_off, lg.to(lg_ptr.dtype.element_ty))
            tl.store(dlg_ptr + st * FP + tile_off, dlg)
            tl.store(dzb_ptr + st * FP + tile_off, dzbar.to(dzb_ptr.dtype.element_ty))
            tl.store(rstd_ptr + st + rows, rstd1)
            tl.store(c_ptr + st + rows, c)
        W = W - t_last * mm(tl.trans(xk), lg, DT, PREC, EMU)
        b = b - t_last * tl.sum(lg, 0)
    if FINISH:
        tl.store(dtok_ptr + pid * BK + rows, dtok)
    if FINISH or REUSE:
        tl.store(dlnw_ptr + pid * FP + cols, dgw)
        tl.store(dlnb_ptr + pid * FP + cols, dgb)


@triton.jit
def _linear_bwd_chain_kernel(
    xq_ptr, xk_ptr, xv_ptr, lr_ptr, tok_ptr, lnw_ptr, lnb_ptr, reset_ptr,
    xh_ptr, lg_ptr, dlg_ptr, dzb_ptr, rstd_ptr, c_ptr, dwf_ptr, dbf_ptr,
    p_ptr, q_ptr, dws_ptr, dbs_ptr, dw0_ptr, db0_ptr,
    T, N, H,
    F: tl.constexpr, FP: tl.constexpr, BK: tl.constexpr, K: tl.constexpr,
    HAS_RESET: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, EMU: tl.constexpr,
):
    """The only sequential part of the backward: carry ``dL/dW``, ``dL/db`` from the last step to the first.

    Per step: ``p = Xk dW' + db'`` and ``q = Lg dW'^T`` (stored for the finishing pass), the step's full
    ``dL/dLg = dLg_local - t_last p``, its path back to ``Z`` (the LayerNorm-L2 gradient's own backward, row-wise)
    and ``dW = dW' + Xq^T dZbar + Xk^T dZ``. One program per (batch, head)."""
    bh = tl.program_id(0).to(tl.int64)
    h = bh % H
    bi = bh // H
    rows = tl.arange(0, BK)
    cols = tl.arange(0, FP)
    cmask = cols < F
    w_off = cols[:, None] * F + cols[None, :]
    w_msk = cmask[:, None] & cmask[None, :]
    tile_off = rows[:, None] * FP + cols[None, :]
    gw = tl.load(lnw_ptr + h * F + cols, mask=cmask, other=0.0).to(tl.float32)
    gb = tl.load(lnb_ptr + h * F + cols, mask=cmask, other=0.0).to(tl.float32)
    gw2 = (gw * gw)[None, :]
    dW = tl.load(dwf_ptr + bh * F * F + w_off, mask=w_msk, other=0.0).to(tl.float32)
    db = tl.load(dbf_ptr + bh * F + cols, mask=cmask, other=0.0).to(tl.float32)
    x_base = bh * T * F
    for i in range(N):
        n = N - 1 - i
        start = n * K
        m = tl.minimum(T - start, K)
        rmask = rows < m
        st = (bh * N + n) * BK
        tile = st * FP + tile_off
        xq = _load_rows(xq_ptr, x_base, start, rows, cols, rmask, cmask, F)
        xk = _load_rows(xk_ptr, x_base, start, rows, cols, rmask, cmask, F)
        xv = _load_rows(xv_ptr, x_base, start, rows, cols, rmask, cmask, F)
        eta = tl.load(lr_ptr + bh * T + start + rows, mask=rmask, other=0.0).to(tl.float32)
        t_last = tl.load(tok_ptr + m - 1).to(tl.float32)
        xh1, lg = tl.load(xh_ptr + tile), tl.load(lg_ptr + tile).to(tl.float32)
        dlg, dzbar = tl.load(dlg_ptr + tile), tl.load(dzb_ptr + tile).to(tl.float32)
        rstd1, c = tl.load(rstd_ptr + st + rows), tl.load(c_ptr + st + rows)
        p = mm(xk, dW, DT, PREC, EMU) + db[None, :]
        q = mm(lg, tl.trans(dW), DT, PREC, EMU)
        tl.store(p_ptr + st * FP + tile_off, p.to(p_ptr.dtype.element_ty))
        tl.store(q_ptr + st * FP + tile_off, q.to(q_ptr.dtype.element_ty))
        # gx as the segment pass computed it (cheaper to recompute from xh1, xv, xk than to store)
        gx = (xh1 * gw[None, :] + gb[None, :] - (xv.to(tl.float32) - xk.to(tl.float32))) * gw[None, :]
        u = dlg - t_last * p
        dg = eta[:, None] * u
        dgx = ln_rows_bwd(dg, xh1, rstd1, cmask, F)
        dxh1 = -rstd1[:, None] * (c[:, None] * dg + (tl.sum(dg * xh1, 1) / F)[:, None] * gx) + dgx * gw2
        # d rstd1 = sum(dg * g) / rstd1 (and dg * g = u * lg), entering dz as -(d rstd1) rstd1^2 xh1 / F
        dz = ln_rows_bwd(dxh1, xh1, rstd1, cmask, F) - (tl.sum(u * lg, 1) * rstd1 / F)[:, None] * xh1
        dW += mm(tl.trans(xq), dzbar, DT, PREC, EMU) + mm(tl.trans(xk), dz, DT, PREC, EMU)
        db += tl.sum(dzbar, 0) + tl.sum(dz, 0)
        if HAS_RESET:  # noqa: SIM102 (constexpr guard first)
            if tl.load(reset_ptr + bi * N + n) != 0:
                tl.store(dw0_ptr + bh * F * F + w_off,
                         tl.load(dw0_ptr + bh * F * F + w_off, mask=w_msk, other=0.0) + dW, mask=w_msk)
                tl.store(db0_ptr + bh * F + cols, tl.load(db0_ptr + bh * F + cols, mask=cmask, other=0.0) + db,
                         mask=cmask)
                dW = tl.zeros([FP, FP], dtype=tl.float32)
                db = tl.zeros([FP], dtype=tl.float32)
    tl.store(dws_ptr + bh * F * F + w_off, dW, mask=w_msk)
    tl.store(dbs_ptr + bh * F + cols, db, mask=cmask)


def _split_forward(config: LinearConfig, programs: int, device: torch.device) -> bool:
    if config.split_fwd is not None:
        return config.split_fwd
    if device.type != "cuda":
        return False
    return 3 * programs <= torch.cuda.get_device_properties(device).multi_processor_count


def _shapes(xq: Tensor, tok: Tensor, every: int) -> tuple[int, int, int, int, int, int, int, int]:
    bsz, heads, seq, f = xq.shape
    k = tok.shape[0]
    n_mb = math.ceil(seq / k)
    return bsz, heads, seq, f, k, n_mb, math.ceil(n_mb / every), max(16, triton.next_power_of_2(k))


def linear_forward(
    xq: Tensor, xk: Tensor, xv: Tensor, lr: Tensor, tok: Tensor, ln_w: Tensor, ln_b: Tensor,
    W0: Tensor, b0: Tensor, sW: Tensor | None, sb: Tensor | None, reset: Tensor | None, save: bool = True,
    config: LinearConfig = DEFAULT_CONFIG,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Run the forward kernel. Inputs must be contiguous; ``reset`` is ``[B, N]`` uint8 or None.

    Returns ``(out, W_final, b_final, ckpt_W, ckpt_b)``; the checkpoints are ``[B*H, NC, FP, FP]`` and
    ``[B*H, NC, FP]`` (padded head dim ``FP``), empty when ``save`` is false; ``config.every`` is the number of
    mini-batches between checkpoints."""
    every = config.every
    bsz, heads, seq, f, k, n_mb, n_ck, bk = _shapes(xq, tok, every)
    fp = padded_dim(f)
    dev = xq.device
    out = torch.empty_like(xq)
    wf = torch.empty(bsz, heads, f, f, device=dev, dtype=torch.float32)
    bf = torch.empty(bsz, heads, f, device=dev, dtype=torch.float32)
    nck = n_ck if save else 0
    ckw = torch.empty(bsz * heads, nck, fp, fp, device=dev, dtype=torch.float32)
    ckb = torch.empty(bsz * heads, nck, fp, device=dev, dtype=torch.float32)
    dt, prec, emu = dot_config(xq.dtype, config.lowp)
    args = (xq, xk, xv, lr, tok, ln_w, ln_b, W0, b0,
            sW if sW is not None else wf, sb if sb is not None else bf, reset if reset is not None else tok,
            out, wf, bf, ckw, ckb, seq, n_mb, n_ck, heads)
    flags = dict(F=f, FP=fp, BK=bk, K=k, C=every, HAS_STATE=sW is not None, HAS_RESET=reset is not None,
                 DT=dt, PREC=prec, EMU=emu, **_launch_opts(config, "fwd", fp, xq.dtype))
    if save and _split_forward(config, bsz * heads, dev):
        # the state chain writes the checkpoints, then every segment's outputs come out in parallel
        _linear_fwd_kernel[(bsz * heads,)](*args, SAVE=True, OUTPUT=False, SEGMENT=False, **flags)
        _linear_fwd_kernel[(bsz * heads * n_ck,)](*args, SAVE=False, OUTPUT=True, SEGMENT=True, **flags)
    else:
        _linear_fwd_kernel[(bsz * heads,)](*args, SAVE=save, OUTPUT=True, SEGMENT=False, **flags)
    return out, wf, bf, ckw, ckb


def linear_backward(
    xq: Tensor, xk: Tensor, xv: Tensor, lr: Tensor, tok: Tensor, ln_w: Tensor, ln_b: Tensor,
    W0: Tensor, b0: Tensor, reset: Tensor | None, ckw: Tensor, ckb: Tensor,
    dout: Tensor, dWf: Tensor, dbf: Tensor, config: LinearConfig = DEFAULT_CONFIG,
) -> dict[str, Tensor]:
    """Run the backward (contiguous inputs, checkpoints from :func:`linear_forward` with the same ``config``).

    Three launches: the checkpoint segments in parallel (each recomputes its states and stores the per-step pieces
    that do not depend on later steps), the short reverse chain through ``dL/dW`` per (batch, head), and the
    segments in parallel again to finish every gradient. Returns per-token grads, ``tok``/``ln_w``/``ln_b`` grads
    reduced over batch (and heads for ``tok``), ``state_W``/``state_b`` (the start state's gradient,
    ``[B,H,...]``) and the reset-point contributions to the initial state ``reset_W``/``reset_b`` (``[H,...]``,
    zero without ``reset``)."""
    every = config.every
    bsz, heads, seq, f, k, n_mb, n_ck, bk = _shapes(xq, tok, every)
    fp = padded_dim(f)
    dev = xq.device
    f32 = dict(device=dev, dtype=torch.float32)
    bh = bsz * heads
    # the per-step scratch: 6 tiles (xh, lg, dlg, dzbar, p, q) and 2 rows (rstd, c); lg, dzbar, p, q (the ones
    # that feed dots) in the input dtype with config.scratch "input"
    tile, row = bh * n_mb * bk * fp, bh * n_mb * bk
    low = xq.dtype if config.scratch == "input" and xq.dtype in (torch.bfloat16, torch.float16) else torch.float32
    full = torch.empty(2 * tile + 2 * row, **f32)
    part = torch.empty(4 * tile, device=dev, dtype=low)
    xh_t, dlg_t = (full[i * tile:(i + 1) * tile].view(bh, n_mb, bk, fp) for i in range(2))
    lg_t, dzb_t, p_t, q_t = (part[i * tile:(i + 1) * tile].view(bh, n_mb, bk, fp) for i in range(4))
    tiles = [xh_t, lg_t, dlg_t, dzb_t, p_t, q_t]
    rows = [full[2 * tile + i * row:2 * tile + (i + 1) * row].view(bh, n_mb, bk) for i in range(2)]
    dxq, dxk, dxv = torch.empty_like(xq), torch.empty_like(xk), torch.empty_like(xv)
    dlr = torch.empty_like(lr)
    dtok = torch.empty(bh * n_ck, bk, **f32)
    dlnw = torch.empty(bsz, heads, n_ck, fp, **f32)
    dlnb = torch.empty(bsz, heads, n_ck, fp, **f32)
    dws = torch.empty(bsz, heads, f, f, **f32)
    dbs = torch.empty(bsz, heads, f, **f32)
    has_reset = reset is not None
    dw0 = torch.zeros(bsz, heads, f, f, **f32) if has_reset else dws
    db0 = torch.zeros(bsz, heads, f, **f32) if has_reset else dbs
    rst = reset if has_reset else tok
    dt, prec, emu = dot_config(xq.dtype, config.lowp)
    dots = dict(DT=dt, PREC=prec, EMU=emu)
    opts = _launch_opts(config, "bwd", fp, xq.dtype)
    for finish in (False, True):
        if finish:
            _linear_bwd_chain_kernel[(bh,)](
                xq, xk, xv, lr, tok, ln_w, ln_b, rst, *tiles[:4], *rows, dWf, dbf, *tiles[4:], dws, dbs, dw0, db0,
                seq, n_mb, heads, F=f, FP=fp, BK=bk, K=k, HAS_RESET=has_reset, **dots,
                **_launch_opts(config, "chain", fp, xq.dtype),
            )
        _linear_bwd_segment_kernel[(bh * n_ck,)](
            xq, xk, xv, lr, tok, ln_w, ln_b, W0, b0, rst, ckw, ckb, dout, *tiles[:4], *rows, *tiles[4:],
            dxq, dxk, dxv, dlr, dtok, dlnw, dlnb,
            seq, n_mb, n_ck, heads,
            F=f, FP=fp, BK=bk, K=k, C=every, HAS_RESET=has_reset, FINISH=finish, REUSE=config.reuse, **dots, **opts,
        )
    return {
        "xq": dxq, "xk": dxk, "xv": dxv, "lr": dlr,
        "tok": dtok[:, :k].sum(0).to(tok.dtype),
        "ln_w": dlnw[..., :f].sum((0, 2)).to(ln_w.dtype), "ln_b": dlnb[..., :f].sum((0, 2)).to(ln_b.dtype),
        "state_W": dws, "state_b": dbs,
        "reset_W": dw0.sum(0) if has_reset else torch.zeros(heads, f, f, **f32),
        "reset_b": db0.sum(0) if has_reset else torch.zeros(heads, f, **f32),
    }
