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

import torch
import torch.nn.functional as F
from torch import Tensor

from tttexp.ops.common import (  # noqa: F401 (re-exported: models and tests use these names from here)
    LN_EPS,
    State,
    compute_dtype,
    gelu_tanh,
    gelu_tanh_grad,
    layer_norm,
    layer_norm_l2_grad,
)
from tttexp.ops.names import TTT_LAYERS
from tttexp.ops.ttt_linear.reference import minibatch_linear
from tttexp.ops.ttt_mlp.reference import minibatch_mlp

LAYERS = TTT_LAYERS


def zero_accumulators(state: State) -> State:
    return tuple(torch.zeros_like(s) for s in state)


def state_shapes(layer: str, batch: int, heads: int, head_dim: int) -> list[tuple[int, ...]]:
    if layer == "linear":
        return [(batch, heads, head_dim, head_dim), (batch, heads, head_dim)]
    if layer == "mlp":
        h = 4 * head_dim
        return [(batch, heads, head_dim, h), (batch, heads, h), (batch, heads, h, head_dim), (batch, heads, head_dim)]
    raise ValueError(f"model.ttt_layer must be one of {LAYERS}, got {layer!r}")


MINIBATCH = {"linear": minibatch_linear, "mlp": minibatch_mlp}


def apply_accumulators(state: State, acc: State, last_tok: Tensor) -> State:
    """The state at the end of a mini-batch whose last token has weight ``last_tok``."""
    return tuple(s - last_tok * a for s, a in zip(state, acc, strict=True))


def reset_rows(state: State, init_state: State, reset: Tensor) -> State:
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
                cur = reset_rows(cur, init_state, reset[:, n])
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
