"""The TTT inner loop in plain PyTorch: the dual form over mini-batches and the primal per-token oracle.

Shapes (per call): ``xq, xk, xv`` are ``[B, H, T, F]``; ``lr`` is ``[B, H, T]`` and already holds
``base_lr * sigmoid(x . w_lr + b_lr) / F``; ``tok`` is ``[K]``, the clamped token weights of the K positions of a
mini-batch; ``ln_w, ln_b`` are the per-head TTT LayerNorm affine ``[H, F]``.

The inner model's state is a tuple of tensors: ``(W [B,H,F,F], b [B,H,F])`` for TTT-Linear and
``(W1 [B,H,F,4F], b1 [B,H,4F], W2 [B,H,4F,F], b2 [B,H,F])`` for TTT-MLP. Inside a mini-batch every token's
gradient is taken at the mini-batch's starting state; token ``i`` sees the state
``W_i = W - tok_i * sum_{j<=i} lr_j * grad_j``. Sums of ``lr_j * grad_j`` that are not yet applied are the
*accumulators*; they let a sequence stop and continue at any position (decoding, chunks that are not multiples of K).

Everything is computed in float32 (float64 when the inputs are float64) with autocast off, so the state and the
LayerNorm statistics never drop to bf16. Outer gradients flow through the closed-form LayerNorm backward
(second-order terms included) by plain autograd.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

LN_EPS = 1e-6
State = tuple[Tensor, ...]

LAYERS = ("linear", "mlp")


def compute_dtype(x: Tensor) -> torch.dtype:
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
    c = math.sqrt(2.0 / math.pi)
    inner = c * (x + 0.044715 * x.pow(3))
    t = torch.tanh(inner)
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * x * x)


def zero_accumulators(state: State) -> State:
    return tuple(torch.zeros_like(s) for s in state)


def state_shapes(layer: str, batch: int, heads: int, head_dim: int) -> list[tuple[int, ...]]:
    if layer == "linear":
        return [(batch, heads, head_dim, head_dim), (batch, heads, head_dim)]
    if layer == "mlp":
        h = 4 * head_dim
        return [(batch, heads, head_dim, h), (batch, heads, h), (batch, heads, h, head_dim), (batch, heads, head_dim)]
    raise ValueError(f"model.ttt_layer must be one of {LAYERS}, got {layer!r}")


# --------------------------------------------------------------------------------------------------------------
# One mini-batch (or a piece of one), with accumulators: the building block of the dual form, chunking and decode.
# --------------------------------------------------------------------------------------------------------------


def _causal_sum(scores: Tensor, values: Tensor) -> Tensor:
    """``sum_{j<=i} scores[i, j] * values[j]`` for every i: ``tril(scores) @ values``."""
    return scores.tril() @ values


def _prefix_sum(values: Tensor) -> Tensor:
    return values.cumsum(-2)


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
    update = _causal_sum(xq @ xk.transpose(-1, -2), lg) + _prefix_sum(lg)
    new_acc = (xk.transpose(-1, -2) @ lg, lg.sum(-2))
    if acc is not None:
        update = update + xq @ acc[0] + acc[1][..., None, :]
        new_acc = (acc[0] + new_acc[0], acc[1] + new_acc[1])
    zbar = xq @ W + b[..., None, :] - t * update
    out = xq + layer_norm(zbar, ln_w, ln_b)
    return out, new_acc


def minibatch_mlp(
    xq: Tensor, xk: Tensor, xv: Tensor, lr: Tensor, tok: Tensor, ln_w: Tensor, ln_b: Tensor,
    state: State, acc: State | None,
) -> tuple[Tensor, State]:
    """As :func:`minibatch_linear` for the two-layer TTT-MLP (hidden 4F, gelu_tanh)."""
    W1, b1, W2, b2 = state
    z1 = xk @ W1 + b1[..., None, :]
    x2 = gelu_tanh(z1)
    z2 = x2 @ W2 + b2[..., None, :]
    g2 = layer_norm_l2_grad(z2, xv - xk, ln_w, ln_b)
    g1 = (g2 @ W2.transpose(-1, -2)) * gelu_tanh_grad(z1)
    lg1, lg2 = lr[..., None] * g1, lr[..., None] * g2
    t = tok[:, None]
    update1 = _causal_sum(xq @ xk.transpose(-1, -2), lg1) + _prefix_sum(lg1)
    if acc is not None:
        update1 = update1 + xq @ acc[0] + acc[1][..., None, :]
    x2bar = gelu_tanh(xq @ W1 + b1[..., None, :] - t * update1)
    update2 = _causal_sum(x2bar @ x2.transpose(-1, -2), lg2) + _prefix_sum(lg2)
    if acc is not None:
        update2 = update2 + x2bar @ acc[2] + acc[3][..., None, :]
    z2bar = x2bar @ W2 + b2[..., None, :] - t * update2
    out = xq + layer_norm(z2bar, ln_w, ln_b)
    new_acc = (xk.transpose(-1, -2) @ lg1, lg1.sum(-2), x2.transpose(-1, -2) @ lg2, lg2.sum(-2))
    if acc is not None:
        new_acc = tuple(a + n for a, n in zip(acc, new_acc, strict=True))
    return out, new_acc


MINIBATCH = {"linear": minibatch_linear, "mlp": minibatch_mlp}


def apply_accumulators(state: State, acc: State, last_tok: Tensor) -> State:
    """The state at the end of a mini-batch whose last token has weight ``last_tok``."""
    return tuple(s - last_tok * a for s, a in zip(state, acc, strict=True))


def _reset_rows(state: State, init_state: State, reset: Tensor) -> State:
    """Rows where ``reset`` ([B] bool) is set go back to the learned initial state (``[H, ...]`` tensors)."""
    out = []
    for s, s0 in zip(state, init_state, strict=True):
        r = reset.view(-1, *([1] * (s.dim() - 1)))
        out.append(torch.where(r, s0.to(s.dtype).expand_as(s), s))
    return tuple(out)


def expand_state(init_state: State, batch: int, dtype: torch.dtype) -> State:
    """Broadcast the learned ``[H, ...]`` initial state to ``[B, H, ...]`` in the compute dtype."""
    return tuple(s0.to(dtype).unsqueeze(0).expand(batch, *s0.shape) for s0 in init_state)


def _prepare(xq: Tensor, xk: Tensor, xv: Tensor, lr: Tensor, tok: Tensor, ln_w: Tensor, ln_b: Tensor):
    dt = compute_dtype(xq)
    return (xq.to(dt), xk.to(dt), xv.to(dt), lr.to(dt), tok.to(dt), ln_w.to(dt), ln_b.to(dt)), dt


def ttt_dual(
    layer: str,
    xq: Tensor, xk: Tensor, xv: Tensor, lr: Tensor, tok: Tensor, ln_w: Tensor, ln_b: Tensor,
    init_state: State,
    state: State | None = None,
    reset: Tensor | None = None,
) -> tuple[Tensor, State]:
    """The dual form over all mini-batches of the sequence; any length (the last mini-batch may be short).

    ``init_state`` holds the learned initial state (``[H, ...]`` tensors); ``state`` the carried ``[B, H, ...]``
    state to start from (``None``: the learned one). ``reset`` (``[B, N]`` bool, ``N = ceil(T / K)``) sends row b
    back to the learned initial state before mini-batch n. Returns ``(out [B,H,T,F] in xq's dtype, final state)``;
    after a short last mini-batch of r tokens the final state is the one its last token saw (``tok[r-1]``).
    """
    if layer not in MINIBATCH:
        raise ValueError(f"model.ttt_layer must be one of {LAYERS}, got {layer!r}")
    out_dtype = xq.dtype
    with torch.autocast(device_type=xq.device.type, enabled=False):
        (xq, xk, xv, lr, tok, ln_w, ln_b), dt = _prepare(xq, xk, xv, lr, tok, ln_w, ln_b)
        bsz, _, seq, _ = xq.shape
        k = tok.shape[0]
        cur = expand_state(init_state, bsz, dt) if state is None else tuple(s.to(dt) for s in state)
        step = MINIBATCH[layer]
        outs = []
        for n, start in enumerate(range(0, seq, k)):
            end = min(start + k, seq)
            if reset is not None:
                cur = _reset_rows(cur, init_state, reset[:, n])
            sl = slice(start, end)
            o, acc = step(
                xq[:, :, sl], xk[:, :, sl], xv[:, :, sl], lr[:, :, sl], tok[: end - start], ln_w, ln_b, cur, None
            )
            outs.append(o)
            cur = apply_accumulators(cur, acc, tok[end - start - 1])
        out = torch.cat(outs, dim=2) if outs else xq.clone()
    return out.to(out_dtype), cur


# --------------------------------------------------------------------------------------------------------------
# The primal form: every token's own inner weights, with the inner gradient taken by autograd. The oracle.
# --------------------------------------------------------------------------------------------------------------


def _inner_predict(layer: str, x: Tensor, params: State) -> Tensor:
    """The inner model f(x; params) for rows ``x [..., F]`` (params without the batch/head dims)."""
    if layer == "linear":
        W, b = params
        return x @ W + b
    W1, b1, W2, b2 = params
    return gelu_tanh(x @ W1 + b1) @ W2 + b2


def _row_layer_norm(z: Tensor, w: Tensor, b: Tensor) -> Tensor:
    return F.layer_norm(z, (z.shape[-1],), w, b, LN_EPS)


def ttt_primal(
    layer: str,
    xq: Tensor, xk: Tensor, xv: Tensor, lr: Tensor, tok: Tensor, ln_w: Tensor, ln_b: Tensor,
    init_state: State,
    state: State | None = None,
    reset: Tensor | None = None,
) -> tuple[Tensor, State]:
    """Per token i of each mini-batch: ``W_i = W - sum_{j<=i} tok_i lr_j grad_W l_j(W)``, ``out_i = xq_i +
    LN(f(xq_i; W_i))``. Slow (a loop over batch, heads and tokens); same signature and results as :func:`ttt_dual`."""
    if layer not in MINIBATCH:
        raise ValueError(f"model.ttt_layer must be one of {LAYERS}, got {layer!r}")
    out_dtype = xq.dtype
    with torch.autocast(device_type=xq.device.type, enabled=False), torch.enable_grad():
        (xq, xk, xv, lr, tok, ln_w, ln_b), dt = _prepare(xq, xk, xv, lr, tok, ln_w, ln_b)
        bsz, heads, seq, _ = xq.shape
        k = tok.shape[0]
        cur = expand_state(init_state, bsz, dt) if state is None else tuple(s.to(dt) for s in state)
        out_rows = []
        finals: list[list[State]] = []
        for bi in range(bsz):
            head_outs, head_finals = [], []
            for h in range(heads):
                params = tuple(s[bi, h] for s in cur)
                toks = []
                for n, start in enumerate(range(0, seq, k)):
                    if reset is not None and bool(reset[bi, n]):
                        params = tuple(s0[h].to(dt) for s0 in init_state)
                    end = min(start + k, seq)
                    params = tuple(p if p.requires_grad else p.detach().requires_grad_(True) for p in params)
                    losses = []
                    for j in range(start, end):
                        pred = _inner_predict(layer, xk[bi, h, j], params)
                        target = xv[bi, h, j] - xk[bi, h, j]
                        losses.append(0.5 * (_row_layer_norm(pred, ln_w[h], ln_b[h]) - target).pow(2).sum())
                    token_params = params
                    for i in range(start, end):
                        weighted = sum(lr[bi, h, j] * losses[j - start] for j in range(start, i + 1))
                        grads = torch.autograd.grad(weighted, params, create_graph=True)
                        token_params = tuple(p - tok[i - start] * g for p, g in zip(params, grads, strict=True))
                        z = _inner_predict(layer, xq[bi, h, i], token_params)
                        toks.append(xq[bi, h, i] + _row_layer_norm(z, ln_w[h], ln_b[h]))
                    params = token_params
                head_outs.append(torch.stack(toks) if toks else xq[bi, h].clone())
                head_finals.append(params)
            out_rows.append(torch.stack(head_outs))
            finals.append(head_finals)
        out = torch.stack(out_rows)
        final = tuple(
            torch.stack([torch.stack([finals[bi][h][i] for h in range(heads)]) for bi in range(bsz)])
            for i in range(len(cur))
        )
    return out.to(out_dtype), final
