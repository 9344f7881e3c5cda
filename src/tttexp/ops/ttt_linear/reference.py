"""One TTT-Linear mini-batch (or a piece of one) in plain PyTorch, with accumulators: the building block of the
dual form (:func:`tttexp.ops.reference.ttt_dual`), chunked calls and decoding."""

from __future__ import annotations

from torch import Tensor

from tttexp.ops.common import State, causal_sum, layer_norm, layer_norm_l2_grad, prefix_sum


def minibatch_linear(
    xq: Tensor, xk: Tensor, xv: Tensor, lr: Tensor, tok: Tensor, ln_w: Tensor, ln_b: Tensor,
    state: State, acc: State | None,
) -> tuple[Tensor, State]:
    """Tokens of one mini-batch at positions given by ``tok`` ([m], their token weights), TTT-Linear.

    ``state`` is the mini-batch's start state, ``acc`` the updates of its earlier tokens (``None``: none yet).
    Returns the outputs ``xq + LN(Zbar)`` and the accumulators including these tokens.
    """
    W, b = state
    z = xk @ W + b[..., None, :]
    g = layer_norm_l2_grad(z, xv - xk, ln_w, ln_b)
    lg = lr[..., None] * g
    t = tok[:, None]
    update = causal_sum(xq @ xk.transpose(-1, -2), lg) + prefix_sum(lg)
    new_acc = (xk.transpose(-1, -2) @ lg, lg.sum(-2))
    if acc is not None:
        update = update + xq @ acc[0] + acc[1][..., None, :]
        new_acc = (acc[0] + new_acc[0], acc[1] + new_acc[1])
    zbar = xq @ W + b[..., None, :] - t * update
    out = xq + layer_norm(zbar, ln_w, ln_b)
    return out, new_acc
