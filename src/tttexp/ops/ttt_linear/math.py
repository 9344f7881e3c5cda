"""The TTT-Linear step and its hand-derived backward in plain PyTorch: the statement the Triton kernels implement.

One mini-batch of ``m`` rows per (batch, head), start state ``W [F, F]``, ``b [F]``, token weights ``t = tok[:m]``,
learning rates ``eta = lr`` (already scaled), ``t_last = tok[m - 1]``::

    Z     = Xk W + b                    target = Xv - Xk
    G     = d/dZ 0.5 ||LN(Z) - target||^2                         (closed form, per row)
    Lg    = eta * G                                              (row scale)
    M     = tril(t_i * (Xq_i . Xk_j + 1))                        ([m, m], j <= i)
    Zbar  = Xq W + b - M Lg
    out   = Xq + LN(Zbar)
    W'    = W - t_last Xk^T Lg          b' = b - t_last sum_j Lg_j

:func:`linear_step_bwd` takes ``dout, dW', db'`` back to every input, second-order terms of the LayerNorm-L2
gradient included. :func:`ttt_linear_manual` runs the whole sequence as the kernels do: a forward that keeps the
state every ``C`` mini-batches, then a reverse sweep that recomputes each segment's states from its checkpoint.
Everything here is batched over ``[B, H]`` and runs in the inputs' dtype (float64 for the checks).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tttexp.ops.common import causal_mask, ln_rows, ln_rows_bwd, reset_to


def linear_step(
    xq: Tensor, xk: Tensor, xv: Tensor, lr: Tensor, t: Tensor, gw: Tensor, gb: Tensor, W: Tensor, b: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """One mini-batch: ``xq, xk, xv [B,H,m,F]``, ``lr [B,H,m]``, ``t [m]``, ``gw, gb [H,F]``, ``W [B,H,F,F]``,
    ``b [B,H,F]``. Returns ``(out, W', b')``."""
    gw_, gb_ = gw[:, None, :], gb[:, None, :]
    z = xk @ W + b[..., None, :]
    xh, rstd = ln_rows(z)
    gx = (xh * gw_ + gb_ - (xv - xk)) * gw_
    g = ln_rows_bwd(gx, xh, rstd)
    lg = lr[..., None] * g
    mm = torch.where(causal_mask(xq.shape[-2], xq.device), t[:, None] * (xq @ xk.transpose(-1, -2) + 1.0), 0.0)
    zbar = xq @ W + b[..., None, :] - mm @ lg
    xh2, _ = ln_rows(zbar)
    out = xq + xh2 * gw_ + gb_
    t_last = t[-1]
    return out, W - t_last * (xk.transpose(-1, -2) @ lg), b - t_last * lg.sum(-2)


def linear_step_bwd(
    xq: Tensor, xk: Tensor, xv: Tensor, lr: Tensor, t: Tensor, gw: Tensor, gb: Tensor, W: Tensor, b: Tensor,
    dout: Tensor, dW1: Tensor, db1: Tensor,
) -> dict[str, Tensor]:
    """Gradients of one :func:`linear_step` given ``dout``, ``dW1 = dL/dW'`` and ``db1 = dL/db'``.

    Returns ``xq, xk, xv, lr`` (per token), ``t`` (``[m]``, summed over B and H), ``gw, gb`` (``[H, F]``, summed
    over B) and ``W, b`` (the start state's gradient, ``[B, H, ...]``)."""
    f = xq.shape[-1]
    gw_, gb_ = gw[:, None, :], gb[:, None, :]
    mask = causal_mask(xq.shape[-2], xq.device)
    t_last = t[-1]
    tcol = t[:, None]
    # recompute
    z = xk @ W + b[..., None, :]
    xh1, rstd1 = ln_rows(z)
    e = xh1 * gw_ + gb_ - (xv - xk)
    gx = e * gw_
    a = gx.mean(-1, keepdim=True)
    c = (gx * xh1).mean(-1, keepdim=True)
    g = rstd1 * (gx - a - xh1 * c)
    eta = lr[..., None]
    lg = eta * g
    s1 = xq @ xk.transpose(-1, -2) + 1.0
    mm = torch.where(mask, tcol * s1, 0.0)
    zbar = xq @ W + b[..., None, :] - mm @ lg
    xh2, rstd2 = ln_rows(zbar)
    # out = xq + LN(zbar)
    dxq = dout.clone()
    dgw = (dout * xh2).sum((0, 2))
    dgb = dout.sum((0, 2))
    dzbar = ln_rows_bwd(dout * gw_, xh2, rstd2)
    # zbar = xq W + b - M lg
    dxq = dxq + dzbar @ W.transpose(-1, -2)
    dW = dW1 + xq.transpose(-1, -2) @ dzbar
    db = db1 + dzbar.sum(-2)
    dmm = torch.where(mask, -(dzbar @ lg.transpose(-1, -2)), 0.0)
    p = xk @ dW1 + db1[..., None, :]
    dlg = -(mm.transpose(-1, -2) @ dzbar) - t_last * p
    dt = (dmm * s1).sum(-1).sum((0, 1))
    dt_last = -(p * lg).sum()
    ds = dmm * tcol
    dxq = dxq + ds @ xk
    dxk = ds.transpose(-1, -2) @ xq - t_last * (lg @ dW1.transpose(-1, -2))
    # W' = W - t_last Xk^T lg, b' = b - t_last sum lg (the identity part is in dW, db above)
    # lg = eta * g
    dlr = (dlg * g).sum(-1)
    dg = eta * dlg
    # g = rstd1 * (gx - mean(gx) - xh1 * mean(gx xh1)), gx = e * gw, e = xh1 gw + gb - target
    dgx = ln_rows_bwd(dg, xh1, rstd1)
    dxh1 = -rstd1 * c * dg - rstd1 * (dg * xh1).mean(-1, keepdim=True) * gx + dgx * gw_ * gw_
    drstd1 = (dg * (gx - a - xh1 * c)).sum(-1, keepdim=True)
    dgw = dgw + (dgx * (e + gw_ * xh1)).sum((0, 2))
    dgb = dgb + (dgx * gw_).sum((0, 2))
    dxv = -dgx * gw_
    dxk = dxk + dgx * gw_
    dz = ln_rows_bwd(dxh1, xh1, rstd1) - drstd1 * rstd1 * rstd1 * xh1 / f
    # z = xk W + b
    dxk = dxk + dz @ W.transpose(-1, -2)
    dW = dW + xk.transpose(-1, -2) @ dz
    db = db + dz.sum(-2)
    dt = dt.clone()
    dt[-1] = dt[-1] + dt_last
    return {"xq": dxq, "xk": dxk, "xv": dxv, "lr": dlr, "t": dt, "gw": dgw, "gb": dgb, "W": dW, "b": db}


def ttt_linear_manual(
    xq: Tensor, xk: Tensor, xv: Tensor, lr: Tensor, tok: Tensor, gw: Tensor, gb: Tensor,
    W0: Tensor, b0: Tensor, state: tuple[Tensor, Tensor] | None, reset: Tensor | None,
    dout: Tensor, dWf: Tensor, dbf: Tensor, every: int = 4,
) -> tuple[Tensor, tuple[Tensor, Tensor], dict[str, Tensor]]:
    """Forward and backward of the whole TTT-Linear sequence, organised as the kernels are.

    Returns ``(out, (W_final, b_final), grads)``; ``grads`` has the keys of :func:`linear_step_bwd` with ``t``
    renamed ``tok`` (``[K]``), plus ``W0, b0`` (``[H, ...]``) and, when ``state`` is given, ``state_W, state_b``.
    """
    bsz, heads, seq, _ = xq.shape
    k = tok.shape[0]
    n_mb = math.ceil(seq / k)
    bounds = [(s, min(s + k, seq)) for s in range(0, seq, k)]
    W, b = (W0.expand(bsz, *W0.shape), b0.expand(bsz, *b0.shape)) if state is None else state
    no_reset = torch.zeros(bsz, dtype=torch.bool, device=xq.device)
    rst = [reset[:, n] if reset is not None else no_reset for n in range(n_mb)]

    def sl(x: Tensor, n: int) -> Tensor:
        return x[:, :, bounds[n][0]: bounds[n][1]]

    def step_args(n: int) -> tuple[Tensor, ...]:
        m = bounds[n][1] - bounds[n][0]
        return sl(xq, n), sl(xk, n), sl(xv, n), sl(lr, n), tok[:m], gw, gb

    ckpts: dict[int, tuple[Tensor, Tensor]] = {}
    outs = []
    for n in range(n_mb):
        if n % every == 0:
            ckpts[n] = (W, b)
        W, b = reset_to(W, b, W0, b0, rst[n])
        o, W, b = linear_step(*step_args(n), W, b)
        outs.append(o)
    out = torch.cat(outs, dim=2)
    final = (W, b)

    grads = {
        "xq": torch.zeros_like(xq), "xk": torch.zeros_like(xk), "xv": torch.zeros_like(xv),
        "lr": torch.zeros_like(lr), "tok": torch.zeros_like(tok), "gw": torch.zeros_like(gw),
        "gb": torch.zeros_like(gb), "W0": torch.zeros_like(W0), "b0": torch.zeros_like(b0),
    }
    dW, db = dWf, dbf
    for s0 in reversed(range(0, n_mb, every)):
        s1 = min(s0 + every, n_mb)
        W, b = ckpts[s0]
        used = []
        for n in range(s0, s1):
            W, b = reset_to(W, b, W0, b0, rst[n])
            used.append((W, b))
            _, W, b = linear_step(*step_args(n), W, b)
        for n in reversed(range(s0, s1)):
            args = step_args(n)
            gr = linear_step_bwd(*args, *used[n - s0], sl(dout, n), dW, db)
            for key in ("xq", "xk", "xv", "lr"):
                sl(grads[key], n).copy_(gr[key])
            grads["tok"][: args[0].shape[2]] += gr["t"]
            grads["gw"] += gr["gw"]
            grads["gb"] += gr["gb"]
            r = rst[n]
            grads["W0"] += torch.where(r[:, None, None, None], gr["W"], 0.0).sum(0)
            grads["b0"] += torch.where(r[:, None, None], gr["b"], 0.0).sum(0)
            dW = torch.where(r[:, None, None, None], 0.0, gr["W"])
            db = torch.where(r[:, None, None], 0.0, gr["b"])
    if state is None:
        grads["W0"] += dW.sum(0)
        grads["b0"] += db.sum(0)
    else:
        grads["state_W"], grads["state_b"] = dW, db
    return out, final, grads
