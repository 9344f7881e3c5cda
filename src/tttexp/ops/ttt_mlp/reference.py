"""One TTT-MLP mini-batch (or a piece of one) in plain PyTorch, with accumulators (hidden 4F, gelu_tanh)."""

from __future__ import annotations

from torch import Tensor

from tttexp.ops.common import State, causal_sum, gelu_tanh, gelu_tanh_grad, layer_norm, layer_norm_l2_grad, prefix_sum


def minibatch_mlp(
    xq: Tensor, xk: Tensor, xv: Tensor, lr: Tensor, tok: Tensor, ln_w: Tensor, ln_b: Tensor,
    state: State, acc: State | None,
) -> tuple[Tensor, State]:
    """As :func:`tttexp.ops.ttt_linear.reference.minibatch_linear` for the two-layer TTT-MLP."""
    W1, b1, W2, b2 = state
    z1 = xk @ W1 + b1[..., None, :]
    x2 = gelu_tanh(z1)
    z2 = x2 @ W2 + b2[..., None, :]
    g2 = layer_norm_l2_grad(z2, xv - xk, ln_w, ln_b)
    g1 = (g2 @ W2.transpose(-1, -2)) * gelu_tanh_grad(z1)
    lg1, lg2 = lr[..., None] * g1, lr[..., None] * g2
    t = tok[:, None]
    update1 = causal_sum(xq @ xk.transpose(-1, -2), lg1) + prefix_sum(lg1)
    if acc is not None:
        update1 = update1 + xq @ acc[0] + acc[1][..., None, :]
    x2bar = gelu_tanh(xq @ W1 + b1[..., None, :] - t * update1)
    update2 = causal_sum(x2bar @ x2.transpose(-1, -2), lg2) + prefix_sum(lg2)
    if acc is not None:
        update2 = update2 + x2bar @ acc[2] + acc[3][..., None, :]
    z2bar = x2bar @ W2 + b2[..., None, :] - t * update2
    out = xq + layer_norm(z2bar, ln_w, ln_b)
    new_acc = (xk.transpose(-1, -2) @ lg1, lg1.sum(-2), x2.transpose(-1, -2) @ lg2, lg2.sum(-2))
    if acc is not None:
        new_acc = tuple(a + n for a, n in zip(acc, new_acc, strict=True))
    return out, new_acc
