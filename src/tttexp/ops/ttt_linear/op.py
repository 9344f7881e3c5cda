"""TTT-Linear as ``torch.library`` custom ops (``tttexp::linear_fwd``, ``tttexp::linear_bwd``) with fake (meta)
implementations and registered autograd, so ``torch.compile`` traces a model that calls them as single opaque nodes
instead of breaking the graph. The launch settings cross the op boundary as text (``""``: the defaults)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tttexp.ops.common import State
from tttexp.ops.triton_utils import config_from_str, config_to_str, padded_dim
from tttexp.ops.ttt_linear.triton import DEFAULT_CONFIG, LinearConfig, linear_backward, linear_forward

F32 = torch.float32


def n_checkpoints(seq: int, k: int, every: int, save: bool) -> int:
    """Checkpoints a training forward saves: one every ``every`` mini-batches of ``k`` tokens."""
    return math.ceil(math.ceil(seq / k) / every) if save else 0


def _config(text: str) -> LinearConfig:
    return config_from_str(LinearConfig, text)


@torch.library.custom_op("tttexp::linear_fwd", mutates_args=())
def linear_fwd_op(
    xq: Tensor, xk: Tensor, xv: Tensor, lr: Tensor, tok: Tensor, ln_w: Tensor, ln_b: Tensor,
    W0: Tensor, b0: Tensor, sW: Tensor | None, sb: Tensor | None, reset: Tensor | None, save: bool, config: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(out, W_final, b_final, ckpt_W, ckpt_b)``; inputs contiguous, ``reset`` uint8 ``[B, N]`` or None."""
    return linear_forward(xq, xk, xv, lr, tok, ln_w, ln_b, W0, b0, sW, sb, reset, save=save, config=_config(config))


@linear_fwd_op.register_fake
def _linear_fwd_fake(xq, xk, xv, lr, tok, ln_w, ln_b, W0, b0, sW, sb, reset, save, config):
    bsz, heads, seq, f = xq.shape
    fp = padded_dim(f)
    nck = n_checkpoints(seq, tok.shape[0], _config(config).every, save)
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
    dout: Tensor, dWf: Tensor, dbf: Tensor, config: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dxq, dxk, dxv, dlr, dtok, dln_w, dln_b, d_start_W, d_start_b, d_reset_W, d_reset_b)``."""
    g = linear_backward(xq, xk, xv, lr, tok, ln_w, ln_b, W0, b0, reset, ckw, ckb, dout, dWf, dbf,
                        config=_config(config))
    return (g["xq"], g["xk"], g["xv"], g["lr"], g["tok"], g["ln_w"], g["ln_b"],
            g["state_W"], g["state_b"], g["reset_W"], g["reset_b"])


@linear_bwd_op.register_fake
def _linear_bwd_fake(xq, xk, xv, lr, tok, ln_w, ln_b, W0, b0, reset, ckw, ckb, dout, dWf, dbf, config):
    bsz, heads, _, f = xq.shape
    return (
        torch.empty_like(xq), torch.empty_like(xk), torch.empty_like(xv), torch.empty_like(lr),
        torch.empty_like(tok), torch.empty_like(ln_w), torch.empty_like(ln_b),
        xq.new_empty((bsz, heads, f, f), dtype=F32), xq.new_empty((bsz, heads, f), dtype=F32),
        xq.new_empty((heads, f, f), dtype=F32), xq.new_empty((heads, f), dtype=F32),
    )


def _setup(ctx, inputs, output) -> None:
    xq, xk, xv, lr, tok, ln_w, ln_b, W0, b0, sW, sb, reset, save, config = inputs
    ctx.save_for_backward(xq, xk, xv, lr, tok, ln_w, ln_b, W0, b0, reset, output[3], output[4])
    ctx.config = config
    ctx.has_state = sW is not None
    ctx.state_dtypes = (sW.dtype, sb.dtype) if sW is not None else None


def _backward(ctx, dout, dWf, dbf, _dckw, _dckb):
    xq, xk, xv, lr, tok, ln_w, ln_b, W0, b0, reset, ckw, ckb = ctx.saved_tensors
    if ckw.shape[1] == 0:
        raise RuntimeError("ttt_triton: backward through a forward that ran without grad (no checkpoints)")
    bsz, heads, _, f = xq.shape
    dout = torch.zeros_like(xq) if dout is None else dout.contiguous()
    dWf = xq.new_zeros((bsz, heads, f, f), dtype=F32) if dWf is None else dWf.contiguous().to(F32)
    dbf = xq.new_zeros((bsz, heads, f), dtype=F32) if dbf is None else dbf.contiguous().to(F32)
    (dxq, dxk, dxv, dlr, dtok, dlnw, dlnb, dsW, dsb, drW, drb) = linear_bwd_op(
        xq, xk, xv, lr, tok, ln_w, ln_b, W0, b0, reset, ckw, ckb, dout, dWf, dbf, ctx.config
    )
    if ctx.has_state:
        dW0, db0 = drW, drb
        dsW, dsb = dsW.to(ctx.state_dtypes[0]), dsb.to(ctx.state_dtypes[1])
    else:
        dW0, db0 = drW + dsW.sum(0), drb + dsb.sum(0)
        dsW = dsb = None
    return (dxq, dxk, dxv, dlr, dtok, dlnw, dlnb, dW0.to(W0.dtype), db0.to(b0.dtype), dsW, dsb, None, None, None)


linear_fwd_op.register_autograd(_backward, setup_context=_setup)


def ttt_linear_triton(
    xq: Tensor, xk: Tensor, xv: Tensor, lr: Tensor, tok: Tensor, ln_w: Tensor, ln_b: Tensor,
    init_state: State, state: State | None, reset: Tensor | None, save: bool,
    config: LinearConfig = DEFAULT_CONFIG,
) -> tuple[Tensor, State]:
    """The op on prepared inputs (contiguous, ``xk, xv`` in ``xq``'s dtype, ``reset`` uint8 or None)."""
    W0, b0 = init_state
    sW, sb = state if state is not None else (None, None)
    out, Wf, bf, _, _ = linear_fwd_op(xq, xk, xv, lr, tok, ln_w, ln_b, W0, b0, sW, sb, reset, save,
                                      config_to_str(config, DEFAULT_CONFIG))
    return out, (Wf, bf)
