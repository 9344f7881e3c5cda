"""The TTT-MLP step and its hand-derived backward in plain PyTorch: the statement the Triton kernels implement.

One mini-batch (rows i, j; hidden 4F; ``s`` = gelu_tanh), start state ``W1, b1, W2, b2``, ``t = tok[:m]``::

    Z1 = Xk W1 + b1     X2 = s(Z1)     Z2 = X2 W2 + b2
    G2 = d/dZ2 0.5 ||LN(Z2) - (Xv - Xk)||^2           G1 = (G2 W2^T) * s'(Z1)
    Lg1 = eta * G1      Lg2 = eta * G2
    M1 = tril(t_i (Xq_i . Xk_j + 1))     Z1bar = Xq W1 + b1 - M1 Lg1      X2bar = s(Z1bar)
    M2 = tril(t_i (X2bar_i . X2_j + 1))  Z2bar = X2bar W2 + b2 - M2 Lg2
    out = Xq + LN(Z2bar)
    W1' = W1 - t_last Xk^T Lg1, b1' = b1 - t_last sum Lg1, W2' = W2 - t_last X2^T Lg2, b2' = b2 - t_last sum Lg2

:func:`mlp_step_bwd` takes ``dout`` and the gradients of the four output state tensors back to every input. It is
ordered as the kernel's passes over the hidden dim are (see ``tttexp.ops.ttt_mlp.triton``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tttexp.ops.common import causal_mask, gelu_parts, ln_rows, ln_rows_bwd, reset_to


def _lnl2(z: Tensor, target: Tensor, gw_: Tensor, gb_: Tensor):
    xh, rstd = ln_rows(z)
    e = xh * gw_ + gb_ - target
    gx = e * gw_
    a = gx.mean(-1, keepdim=True)
    c = (gx * xh).mean(-1, keepdim=True)
    return rstd * (gx - a - xh * c), (xh, rstd, e, gx, a, c)


def _lnl2_bwd(dg: Tensor, parts, gw_: Tensor):
    """Back through ``G = LN-L2 gradient(z)``: returns ``dz``, ``dgw``, ``dgb`` (per row) and ``dtarget``."""
    xh, rstd, e, gx, a, c = parts
    f = xh.shape[-1]
    dgx = ln_rows_bwd(dg, xh, rstd)
    dxh = -rstd * c * dg - rstd * (dg * xh).mean(-1, keepdim=True) * gx + dgx * gw_ * gw_
    drstd = (dg * (gx - a - xh * c)).sum(-1, keepdim=True)
    dz = ln_rows_bwd(dxh, xh, rstd) - drstd * rstd * rstd * xh / f
    return dz, dgx * (e + gw_ * xh), dgx * gw_, -dgx * gw_


def _forward(xq, xk, xv, lr, t, gw, gb, W1, b1, W2, b2):
    gw_, gb_ = gw[:, None, :], gb[:, None, :]
    mask = causal_mask(xq.shape[-2], xq.device)
    eta = lr[..., None]
    z1 = xk @ W1 + b1[..., None, :]
    x2, ds1, dds1 = gelu_parts(z1)
    z2 = x2 @ W2 + b2[..., None, :]
    g2, parts2 = _lnl2(z2, xv - xk, gw_, gb_)
    p = g2 @ W2.transpose(-1, -2)
    g1 = p * ds1
    lg1, lg2 = eta * g1, eta * g2
    s1 = xq @ xk.transpose(-1, -2) + 1.0
    m1 = torch.where(mask, t[:, None] * s1, 0.0)
    z1bar = xq @ W1 + b1[..., None, :] - m1 @ lg1
    x2bar, ds1bar, _ = gelu_parts(z1bar)
    s2 = x2bar @ x2.transpose(-1, -2) + 1.0
    m2 = torch.where(mask, t[:, None] * s2, 0.0)
    z2bar = x2bar @ W2 + b2[..., None, :] - m2 @ lg2
    return locals()


def mlp_step(xq, xk, xv, lr, t, gw, gb, W1, b1, W2, b2) -> tuple[Tensor, tuple[Tensor, ...]]:
    """One mini-batch of TTT-MLP (shapes as ``ttt_linear.math.linear_step``). Returns ``(out, new state)``."""
    v = _forward(xq, xk, xv, lr, t, gw, gb, W1, b1, W2, b2)
    xh, _ = ln_rows(v["z2bar"])
    out = xq + xh * gw[:, None, :] + gb[:, None, :]
    tl_ = t[-1]
    lg1, lg2 = v["lg1"], v["lg2"]
    return out, (W1 - tl_ * (xk.transpose(-1, -2) @ lg1), b1 - tl_ * lg1.sum(-2),
                 W2 - tl_ * (v["x2"].transpose(-1, -2) @ lg2), b2 - tl_ * lg2.sum(-2))


def mlp_step_bwd(xq, xk, xv, lr, t, gw, gb, W1, b1, W2, b2, dout, dW1n, db1n, dW2n, db2n) -> dict[str, Tensor]:
    """Gradients of one :func:`mlp_step` given ``dout`` and the gradients of its output state (``d*n``).

    Keys: ``xq, xk, xv, lr`` (per token), ``t`` (``[m]``, summed over B, H), ``gw, gb`` (``[H, F]``), and
    ``W1, b1, W2, b2`` (the start state's gradient)."""
    v = _forward(xq, xk, xv, lr, t, gw, gb, W1, b1, W2, b2)
    gw_ = gw[:, None, :]
    mask = causal_mask(xq.shape[-2], xq.device)
    tcol, t_last, eta = t[:, None], t[-1], lr[..., None]
    x2, x2bar, g1, g2, lg1, lg2 = v["x2"], v["x2bar"], v["g1"], v["g2"], v["lg1"], v["lg2"]
    m1, m2, s1, s2 = v["m1"], v["m2"], v["s1"], v["s2"]
    # out = xq + LN(z2bar)
    xh, rstd = ln_rows(v["z2bar"])
    dxq = dout.clone()
    dgw = (dout * xh).sum((0, 2))
    dgb = dout.sum((0, 2))
    dz2bar = ln_rows_bwd(dout * gw_, xh, rstd)
    # z2bar = x2bar W2 + b2 - M2 lg2 ; W2', b2' update
    dW2 = dW2n + x2bar.transpose(-1, -2) @ dz2bar
    db2 = db2n + dz2bar.sum(-2)
    dm2 = torch.where(mask, -(dz2bar @ lg2.transpose(-1, -2)), 0.0)
    q2 = x2 @ dW2n + db2n[..., None, :]
    dlg2 = -(m2.transpose(-1, -2) @ dz2bar) - t_last * q2
    dt = (dm2 * s2).sum(-1)
    dt_last = -(q2 * lg2).sum((-1, -2))
    ds2 = dm2 * tcol
    dx2bar = dz2bar @ W2.transpose(-1, -2) + ds2 @ x2
    dx2 = ds2.transpose(-1, -2) @ x2bar - t_last * (lg2 @ dW2n.transpose(-1, -2))
    # x2bar = s(z1bar) ; z1bar = xq W1 + b1 - M1 lg1 ; W1', b1' update
    dz1bar = dx2bar * v["ds1bar"]
    dxq = dxq + dz1bar @ W1.transpose(-1, -2)
    dW1 = dW1n + xq.transpose(-1, -2) @ dz1bar
    db1 = db1n + dz1bar.sum(-2)
    dm1 = torch.where(mask, -(dz1bar @ lg1.transpose(-1, -2)), 0.0)
    q1 = xk @ dW1n + db1n[..., None, :]
    dlg1 = -(m1.transpose(-1, -2) @ dz1bar) - t_last * q1
    dt = dt + (dm1 * s1).sum(-1)
    dt_last = dt_last - (q1 * lg1).sum((-1, -2))
    ds1m = dm1 * tcol
    dxq = dxq + ds1m @ xk
    dxk = ds1m.transpose(-1, -2) @ xq - t_last * (lg1 @ dW1n.transpose(-1, -2))
    # lg = eta * g
    dlr = (dlg1 * g1).sum(-1) + (dlg2 * g2).sum(-1)
    dg1, dg2 = eta * dlg1, eta * dlg2
    # g1 = (g2 W2^T) * s'(z1)
    dp = dg1 * v["ds1"]
    dz1 = dg1 * v["p"] * v["dds1"]
    dg2 = dg2 + dp @ W2
    dW2 = dW2 + dp.transpose(-1, -2) @ g2
    # g2 = LN-L2 gradient at z2
    dz2, dgw_rows, dgb_rows, dtarget = _lnl2_bwd(dg2, v["parts2"], gw_)
    dgw = dgw + dgw_rows.sum((0, 2))
    dgb = dgb + dgb_rows.sum((0, 2))
    dxv = dtarget
    dxk = dxk - dtarget
    # z2 = x2 W2 + b2 ; x2 = s(z1) ; z1 = xk W1 + b1
    dx2 = dx2 + dz2 @ W2.transpose(-1, -2)
    dW2 = dW2 + x2.transpose(-1, -2) @ dz2
    db2 = db2 + dz2.sum(-2)
    dz1 = dz1 + dx2 * v["ds1"]
    dxk = dxk + dz1 @ W1.transpose(-1, -2)
    dW1 = dW1 + xk.transpose(-1, -2) @ dz1
    db1 = db1 + dz1.sum(-2)
    dt = dt.sum((0, 1))
    dt[-1] = dt[-1] + dt_last.sum()
    return {"xq": dxq, "xk": dxk, "xv": dxv, "lr": dlr, "t": dt, "gw": dgw, "gb": dgb,
            "W1": dW1, "b1": db1, "W2": dW2, "b2": db2}


def ttt_mlp_manual(
    xq: Tensor, xk: Tensor, xv: Tensor, lr: Tensor, tok: Tensor, gw: Tensor, gb: Tensor,
    init: tuple[Tensor, ...], state: tuple[Tensor, ...] | None, reset: Tensor | None,
    dout: Tensor, dfinal: tuple[Tensor, ...],
) -> tuple[Tensor, tuple[Tensor, ...], dict[str, Tensor]]:
    """Forward and backward of a whole TTT-MLP sequence (states kept per mini-batch: a check, not a kernel plan)."""
    bsz, _, seq, _ = xq.shape
    k = tok.shape[0]
    n_mb = math.ceil(seq / k)
    bounds = [(s, min(s + k, seq)) for s in range(0, seq, k)]
    cur = tuple(s.expand(bsz, *s.shape) for s in init) if state is None else state
    no_reset = torch.zeros(bsz, dtype=torch.bool, device=xq.device)
    rst = [reset[:, n] if reset is not None else no_reset for n in range(n_mb)]

    def args(n: int) -> tuple[Tensor, ...]:
        s, e = bounds[n]
        return xq[:, :, s:e], xk[:, :, s:e], xv[:, :, s:e], lr[:, :, s:e], tok[: e - s], gw, gb

    def reset_state(st, r):
        W1, b1 = reset_to(st[0], st[1], init[0], init[1], r)
        W2, b2 = reset_to(st[2], st[3], init[2], init[3], r)
        return W1, b1, W2, b2

    used, outs = [], []
    for n in range(n_mb):
        cur = reset_state(cur, rst[n])
        used.append(cur)
        o, cur = mlp_step(*args(n), *cur)
        outs.append(o)
    grads = {key: torch.zeros_like(x) for key, x in
             [("xq", xq), ("xk", xk), ("xv", xv), ("lr", lr), ("tok", tok), ("gw", gw), ("gb", gb)]}
    grads["init"] = [torch.zeros_like(s) for s in init]
    d = list(dfinal)
    for n in reversed(range(n_mb)):
        s, e = bounds[n]
        g = mlp_step_bwd(*args(n), *used[n], dout[:, :, s:e], *d)
        for key in ("xq", "xk", "xv", "lr"):
            grads[key][:, :, s:e] = g[key]
        grads["tok"][: e - s] += g["t"]
        grads["gw"] += g["gw"]
        grads["gb"] += g["gb"]
        r = rst[n]
        d = []
        for i, key in enumerate(("W1", "b1", "W2", "b2")):
            rr = r.view(-1, *([1] * (g[key].dim() - 1)))
            grads["init"][i] += torch.where(rr, g[key], 0.0).sum(0)
            d.append(torch.where(rr, 0.0, g[key]))
    if state is None:
        for i in range(4):
            grads["init"][i] += d[i].sum(0)
    else:
        grads["state"] = d
    return torch.cat(outs, 2), cur, grads
