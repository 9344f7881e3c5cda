"""TTT-MLP as ``torch.library`` custom ops (``tttexp::mlp_fwd``, ``tttexp::mlp_bwd``), as
:mod:`tttexp.ops.ttt_linear.op`."""

from __future__ import annotations

import torch
from torch import Tensor

from tttexp.ops.common import State
from tttexp.ops.triton_utils import config_from_str, config_to_str, padded_dim
from tttexp.ops.ttt_linear.op import n_checkpoints
from tttexp.ops.ttt_mlp.split import mlp_backward_split
from tttexp.ops.ttt_mlp.triton import DEFAULT_CONFIG, MLPConfig, mlp_backward, mlp_forward

F32 = torch.float32


def _config(text: str) -> MLPConfig:
    return config_from_str(MLPConfig, text)


@torch.library.custom_op("tttexp::mlp_fwd", mutates_args=())
def mlp_fwd_op(
    xq: Tensor, xk: Tensor, xv: Tensor, lr: Tensor, tok: Tensor, ln_w: Tensor, ln_b: Tensor,
    W1: Tensor, b1: Tensor, W2: Tensor, b2: Tensor, s: list[Tensor], reset: Tensor | None, save: bool, config: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(out, W1_final, b1_final, W2_final, b2_final, 4 checkpoint tensors)``; ``s`` is the carried state or
    empty."""
    out, final, ckpt = mlp_forward(xq, xk, xv, lr, tok, ln_w, ln_b, (W1, b1, W2, b2), tuple(s) if s else None,
                                   reset, save=save, config=_config(config))
    return (out, *final, *ckpt)


@mlp_fwd_op.register_fake
def _mlp_fwd_fake(xq, xk, xv, lr, tok, ln_w, ln_b, W1, b1, W2, b2, s, reset, save, config):
    bsz, heads, seq, f = xq.shape
    fp, hid = padded_dim(f), 4 * f
    nck = n_checkpoints(seq, tok.shape[0], _config(config).every, save)
    bh = bsz * heads
    final = tuple(xq.new_empty((bsz, *p.shape), dtype=F32) for p in (W1, b1, W2, b2))
    ckpt = tuple(xq.new_empty(shape, dtype=F32) for shape in
                 [(bh, nck, fp, hid), (bh, nck, hid), (bh, nck, hid, fp), (bh, nck, fp)])
    return (torch.empty_like(xq), *final, *ckpt)


@torch.library.custom_op("tttexp::mlp_bwd", mutates_args=())
def mlp_bwd_op(
    xq: Tensor, xk: Tensor, xv: Tensor, lr: Tensor, tok: Tensor, ln_w: Tensor, ln_b: Tensor,
    W1: Tensor, b1: Tensor, W2: Tensor, b2: Tensor, reset: Tensor | None, ckpt: list[Tensor],
    dout: Tensor, dfinal: list[Tensor], config: str,
) -> list[Tensor]:
    """``[dxq, dxk, dxv, dlr, dtok, dln_w, dln_b, 4 x d_start_state, 4 x d_reset_init]``."""
    cfg = _config(config)
    backward = mlp_backward_split if cfg.split_bwd else mlp_backward
    g = backward(xq, xk, xv, lr, tok, ln_w, ln_b, (W1, b1, W2, b2), reset, tuple(ckpt), dout, tuple(dfinal),
                 config=cfg)
    return [g["xq"], g["xk"], g["xv"], g["lr"], g["tok"], g["ln_w"], g["ln_b"], *g["state"], *g["reset"]]


@mlp_bwd_op.register_fake
def _mlp_bwd_fake(xq, xk, xv, lr, tok, ln_w, ln_b, W1, b1, W2, b2, reset, ckpt, dout, dfinal, config):
    bsz = xq.shape[0]
    state = [xq.new_empty((bsz, *p.shape), dtype=F32) for p in (W1, b1, W2, b2)]
    return [torch.empty_like(x) for x in (xq, xk, xv, lr, tok, ln_w, ln_b)] + state + [
        xq.new_empty(p.shape, dtype=F32) for p in (W1, b1, W2, b2)]


def _setup(ctx, inputs, output) -> None:
    xq, xk, xv, lr, tok, ln_w, ln_b, W1, b1, W2, b2, s, reset, save, config = inputs
    ctx.n_state = len(s)
    ctx.config = config
    ctx.state_dtypes = tuple(x.dtype for x in s)
    ctx.save_for_backward(xq, xk, xv, lr, tok, ln_w, ln_b, W1, b1, W2, b2, reset, *output[5:])


def _backward(ctx, dout, *dgrads):
    xq, xk, xv, lr, tok, ln_w, ln_b, W1, b1, W2, b2, reset, *ckpt = ctx.saved_tensors
    if ckpt[0].shape[1] == 0:
        raise RuntimeError("ttt_triton: backward through a forward that ran without grad (no checkpoints)")
    bsz = xq.shape[0]
    init = (W1, b1, W2, b2)
    dout = torch.zeros_like(xq) if dout is None else dout.contiguous()
    dfin = [xq.new_zeros((bsz, *p.shape), dtype=F32) if d is None else d.contiguous().to(F32)
            for d, p in zip(dgrads[:4], init, strict=True)]
    g = mlp_bwd_op(xq, xk, xv, lr, tok, ln_w, ln_b, W1, b1, W2, b2, reset, list(ckpt), dout, dfin, ctx.config)
    dstate, dreset = g[7:11], g[11:15]
    if ctx.n_state:
        dinit = dreset
        ds = [d.to(dt) for d, dt in zip(dstate, ctx.state_dtypes, strict=True)]
    else:
        dinit = [r + d.sum(0) for r, d in zip(dreset, dstate, strict=True)]
        ds = []
    dinit = [d.to(p.dtype) for d, p in zip(dinit, init, strict=True)]
    return (*g[:7], *dinit, ds, None, None, None)


mlp_fwd_op.register_autograd(_backward, setup_context=_setup)


def ttt_mlp_triton(
    xq: Tensor, xk: Tensor, xv: Tensor, lr: Tensor, tok: Tensor, ln_w: Tensor, ln_b: Tensor,
    init_state: State, state: State | None, reset: Tensor | None, save: bool,
    config: MLPConfig = DEFAULT_CONFIG,
) -> tuple[Tensor, State]:
    """The op on prepared inputs (contiguous, ``xk, xv`` in ``xq``'s dtype, ``reset`` uint8 or None)."""
    out, *rest = mlp_fwd_op(xq, xk, xv, lr, tok, ln_w, ln_b, *init_state, list(state or ()), reset, save,
                            config_to_str(config, DEFAULT_CONFIG))
    return out, tuple(rest[:4])
