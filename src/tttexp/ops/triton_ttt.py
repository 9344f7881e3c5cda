"""Entry point of the Triton TTT inner loop: ``ttt_triton``, same signature and semantics as ``reference.ttt_dual``.

The kernels are wrapped as ``torch.library`` custom ops (``tttexp::linear_fwd``, ``tttexp::linear_bwd``, ...) with
fake (meta) implementations and registered autograd, so ``torch.compile`` traces a model that calls them as single
opaque nodes instead of breaking the graph. TTT-Linear and TTT-MLP both run forward and backward in Triton
(hand-derived backwards, stated in plain PyTorch in ``triton_linear_math`` and ``triton_mlp_math``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tttexp.ops import reference
from tttexp.ops.reference import LAYERS, State
from tttexp.ops.triton_common import padded_dim
from tttexp.ops.triton_linear import CONFIG, linear_backward, linear_forward
from tttexp.ops.triton_mlp import CONFIG as MLP_CONFIG
from tttexp.ops.triton_mlp import mlp_backward, mlp_forward

F32 = torch.float32
LOWP = (torch.bfloat16, torch.float16)


def _n_ckpt(seq: int, k: int, every: int, save: bool) -> int:
    return math.ceil(math.ceil(seq / k) / every) if save else 0


# ------------------------------------------------------------------------------------------------------------
# TTT-Linear
# ------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("tttexp::linear_fwd", mutates_args=())
def linear_fwd_op(
    xq: Tensor, xk: Tensor, xv: Tensor, lr: Tensor, tok: Tensor, ln_w: Tensor, ln_b: Tensor,
    W0: Tensor, b0: Tensor, sW: Tensor | None, sb: Tensor | None, reset: Tensor | None, every: int, save: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(out, W_final, b_final, ckpt_W, ckpt_b)``; inputs contiguous, ``reset`` uint8 ``[B, N]`` or None."""
    return linear_forward(xq, xk, xv, lr, tok, ln_w, ln_b, W0, b0, sW, sb, reset, save=save, every=every)


@linear_fwd_op.register_fake
def _linear_fwd_fake(xq, xk, xv, lr, tok, ln_w, ln_b, W0, b0, sW, sb, reset, every, save):
    bsz, heads, seq, f = xq.shape
    fp = padded_dim(f)
    nck = _n_ckpt(seq, tok.shape[0], every, save)
    return (
        torch.empty_like(xq),
        xq.new_empty((bsz, heads, f, f), dtype=F32),
        xq.new_empty((bsz, heads, f), dtype=F32),
        xq.new_empty((bsz * heads, nck, fp, fp), dtype=F32),
        xq.new_empty((bsz * heads, nck, fp), dtype=F32),
    )


@torch.library.custom_op("tttexp::linear_bwd", mutates_args=())
def linear_bwd_op(
    xq: Tensor, xk: Tensor, xv: Tensor, lr: Tensor, tok: Tensor, ln_w: Tensor, ln_b: Tensor,
    W0: Tensor, b0: Tensor, reset: Tensor | None, ckw: Tensor, ckb: Tensor,
    dout: Tensor, dWf: Tensor, dbf: Tensor, every: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dxq, dxk, dxv, dlr, dtok, dln_w, dln_b, d_start_W, d_start_b, d_reset_W, d_reset_b)``."""
    g = linear_backward(xq, xk, xv, lr, tok, ln_w, ln_b, W0, b0, reset, ckw, ckb, dout, dWf, dbf, every=every)
    return (g["xq"], g["xk"], g["xv"], g["lr"], g["tok"], g["ln_w"], g["ln_b"],
            g["state_W"], g["state_b"], g["reset_W"], g["reset_b"])


@linear_bwd_op.register_fake
def _linear_bwd_fake(xq, xk, xv, lr, tok, ln_w, ln_b, W0, b0, reset, ckw, ckb, dout, dWf, dbf, every):
    bsz, heads, _, f = xq.shape
    return (
        torch.empty_like(xq), torch.empty_like(xk), torch.empty_like(xv), torch.empty_like(lr),
        torch.empty_like(tok), torch.empty_like(ln_w), torch.empty_like(ln_b),
        xq.new_empty((bsz, heads, f, f), dtype=F32), xq.new_empty((bsz, heads, f), dtype=F32),
        xq.new_empty((heads, f, f), dtype=F32), xq.new_empty((heads, f), dtype=F32),
    )


def _linear_setup(ctx, inputs, output) -> None:
    xq, xk, xv, lr, tok, ln_w, ln_b, W0, b0, sW, sb, reset, every, save = inputs
    ctx.save_for_backward(xq, xk, xv, lr, tok, ln_w, ln_b, W0, b0, reset, output[3], output[4])
    ctx.every = every
    ctx.has_state = sW is not None
    ctx.state_dtypes = (sW.dtype, sb.dtype) if sW is not None else None


def _linear_backward(ctx, dout, dWf, dbf, _dckw, _dckb):
    xq, xk, xv, lr, tok, ln_w, ln_b, W0, b0, reset, ckw, ckb = ctx.saved_tensors
    if ckw.shape[1] == 0:
        raise RuntimeError("ttt_triton: backward through a forward that ran without grad (no checkpoints)")
    bsz, heads, _, f = xq.shape
    dout = torch.zeros_like(xq) if dout is None else dout.contiguous()
    dWf = xq.new_zeros((bsz, heads, f, f), dtype=F32) if dWf is None else dWf.contiguous().to(F32)
    dbf = xq.new_zeros((bsz, heads, f), dtype=F32) if dbf is None else dbf.contiguous().to(F32)
    (dxq, dxk, dxv, dlr, dtok, dlnw, dlnb, dsW, dsb, drW, drb) = linear_bwd_op(
        xq, xk, xv, lr, tok, ln_w, ln_b, W0, b0, reset, ckw, ckb, dout, dWf, dbf, ctx.every
    )
    if ctx.has_state:
        dW0, db0 = drW, drb
        dsW, dsb = dsW.to(ctx.state_dtypes[0]), dsb.to(ctx.state_dtypes[1])
    else:
        dW0, db0 = drW + dsW.sum(0), drb + dsb.sum(0)
        dsW = dsb = None
    return (dxq, dxk, dxv, dlr, dtok, dlnw, dlnb, dW0.to(W0.dtype), db0.to(b0.dtype), dsW, dsb,
            None, None, None)


linear_fwd_op.register_autograd(_linear_backward, setup_context=_linear_setup)


# ------------------------------------------------------------------------------------------------------------
# TTT-MLP
# ------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("tttexp::mlp_fwd", mutates_args=())
def mlp_fwd_op(
    xq: Tensor, xk: Tensor, xv: Tensor, lr: Tensor, tok: Tensor, ln_w: Tensor, ln_b: Tensor,
    W1: Tensor, b1: Tensor, W2: Tensor, b2: Tensor, s: list[Tensor], reset: Tensor | None, every: int, save: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(out, W1_final, b1_final, W2_final, b2_final, 4 checkpoint tensors)``; ``s`` is the carried state or
    empty."""
    out, final, ckpt = mlp_forward(xq, xk, xv, lr, tok, ln_w, ln_b, (W1, b1, W2, b2), tuple(s) if s else None,
                                   reset, save=save, every=every)
    return (out, *final, *ckpt)


@mlp_fwd_op.register_fake
def _mlp_fwd_fake(xq, xk, xv, lr, tok, ln_w, ln_b, W1, b1, W2, b2, s, reset, every, save):
    bsz, heads, seq, f = xq.shape
    fp, hid = padded_dim(f), 4 * f
    nck = _n_ckpt(seq, tok.shape[0], every, save)
    bh = bsz * heads
    final = tuple(xq.new_empty((bsz, *p.shape), dtype=F32) for p in (W1, b1, W2, b2))
    ckpt = tuple(xq.new_empty(shape, dtype=F32) for shape in
                 [(bh, nck, fp, hid), (bh, nck, hid), (bh, nck, hid, fp), (bh, nck, fp)])
    return (torch.empty_like(xq), *final, *ckpt)


@torch.library.custom_op("tttexp::mlp_bwd", mutates_args=())
def mlp_bwd_op(
    xq: Tensor, xk: Tensor, xv: Tensor, lr: Tensor, tok: Tensor, ln_w: Tensor, ln_b: Tensor,
    W1: Tensor, b1: Tensor, W2: Tensor, b2: Tensor, reset: Tensor | None, ckpt: list[Tensor],
    dout: Tensor, dfinal: list[Tensor], every: int,
) -> list[Tensor]:
    """``[dxq, dxk, dxv, dlr, dtok, dln_w, dln_b, 4 x d_start_state, 4 x d_reset_init]``."""
    g = mlp_backward(xq, xk, xv, lr, tok, ln_w, ln_b, (W1, b1, W2, b2), reset, tuple(ckpt), dout, tuple(dfinal),
                     every=every)
    return [g["xq"], g["xk"], g["xv"], g["lr"], g["tok"], g["ln_w"], g["ln_b"], *g["state"], *g["reset"]]


@mlp_bwd_op.register_fake
def _mlp_bwd_fake(xq, xk, xv, lr, tok, ln_w, ln_b, W1, b1, W2, b2, reset, ckpt, dout, dfinal, every):
    bsz = xq.shape[0]
    state = [xq.new_empty((bsz, *p.shape), dtype=F32) for p in (W1, b1, W2, b2)]
    return [torch.empty_like(x) for x in (xq, xk, xv, lr, tok, ln_w, ln_b)] + state + [
        xq.new_empty(p.shape, dtype=F32) for p in (W1, b1, W2, b2)]


def _mlp_setup(ctx, inputs, output) -> None:
    xq, xk, xv, lr, tok, ln_w, ln_b, W1, b1, W2, b2, s, reset, every, save = inputs
    ctx.n_state = len(s)
    ctx.every = every
    ctx.state_dtypes = tuple(x.dtype for x in s)
    ctx.save_for_backward(xq, xk, xv, lr, tok, ln_w, ln_b, W1, b1, W2, b2, reset, *output[5:])


def _mlp_backward(ctx, dout, *dgrads):
    xq, xk, xv, lr, tok, ln_w, ln_b, W1, b1, W2, b2, reset, *ckpt = ctx.saved_tensors
    if ckpt[0].shape[1] == 0:
        raise RuntimeError("ttt_triton: backward through a forward that ran without grad (no checkpoints)")
    bsz = xq.shape[0]
    init = (W1, b1, W2, b2)
    dout = torch.zeros_like(xq) if dout is None else dout.contiguous()
    dfin = [xq.new_zeros((bsz, *p.shape), dtype=F32) if d is None else d.contiguous().to(F32)
            for d, p in zip(dgrads[:4], init, strict=True)]
    g = mlp_bwd_op(xq, xk, xv, lr, tok, ln_w, ln_b, W1, b1, W2, b2, reset, list(ckpt), dout, dfin, ctx.every)
    dstate, dreset = g[7:11], g[11:15]
    if ctx.n_state:
        dinit = dreset
        ds = [d.to(dt) for d, dt in zip(dstate, ctx.state_dtypes, strict=True)]
    else:
        dinit = [r + d.sum(0) for r, d in zip(dreset, dstate, strict=True)]
        ds = []
    dinit = [d.to(p.dtype) for d, p in zip(dinit, init, strict=True)]
    return (*g[:7], *dinit, ds, None, None, None)


mlp_fwd_op.register_autograd(_mlp_backward, setup_context=_mlp_setup)


# ------------------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------------------


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def ttt_triton(
    layer: str,
    xq: Tensor, xk: Tensor, xv: Tensor, lr: Tensor, tok: Tensor, ln_w: Tensor, ln_b: Tensor,
    init_state: State,
    state: State | None = None,
    reset: Tensor | None = None,
) -> tuple[Tensor, State]:
    """The TTT inner loop in Triton; see :func:`tttexp.ops.reference.ttt_dual` for shapes and semantics.

    ``xk, xv`` are cast to ``xq``'s dtype (the dots run in it); float64 inputs and empty sequences go to the
    reference. The final state is float32.
    """
    if layer not in LAYERS:
        raise ValueError(f"model.ttt_layer must be one of {LAYERS}, got {layer!r}")
    if xq.dtype not in (F32, *LOWP) or xq.shape[2] == 0:
        return reference.ttt_dual(layer, xq, xk, xv, lr, tok, ln_w, ln_b, init_state, state=state, reset=reset)
    xq = xq.contiguous()
    xk = xk.to(xq.dtype).contiguous()
    xv = xv.to(xq.dtype).contiguous()
    lr, tok, ln_w, ln_b = lr.contiguous(), tok.contiguous(), ln_w.contiguous(), ln_b.contiguous()
    init_state = tuple(s.contiguous() for s in init_state)
    state = None if state is None else tuple(s.contiguous() for s in state)
    r8 = None if reset is None else reset.to(torch.uint8).contiguous()
    if layer == "linear":
        W0, b0 = init_state
        sW, sb = state if state is not None else (None, None)
        save = _needs_grad(xq, xk, xv, lr, tok, ln_w, ln_b, W0, b0, sW, sb)
        out, Wf, bf, _, _ = linear_fwd_op(xq, xk, xv, lr, tok, ln_w, ln_b, W0, b0, sW, sb, r8,
                                          int(CONFIG["every"]), save)
        return out, (Wf, bf)
    save = _needs_grad(xq, xk, xv, lr, tok, ln_w, ln_b, *init_state, *(state or ()))
    out, *rest = mlp_fwd_op(xq, xk, xv, lr, tok, ln_w, ln_b, *init_state, list(state or ()), r8,
                            int(MLP_CONFIG["every"]), save)
    return out, tuple(rest[:4])
