"""The single entry to the TTT inner loop: pick the PyTorch reference or the Triton kernels, for whole sequences
(:func:`ttt`) and for one decoded token (:func:`decode_step`)."""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from tttexp.ops import reference
from tttexp.ops.common import State
from tttexp.ops.names import KERNELS, TTT_LAYERS

LOWP = (torch.bfloat16, torch.float16)


def triton_available() -> bool:
    """True when Triton can run here: a CUDA device, or the interpreter (``TRITON_INTERPRET=1``)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _kernels_importable() -> bool:
    try:
        import tttexp.ops.ttt_linear.op  # noqa: F401
        import tttexp.ops.ttt_mlp.op  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_kernel(kernel: str, device_type: str) -> str:
    """Map ``model.kernel`` to the implementation used on ``device_type``: ``"triton"`` or ``"torch"``."""
    if kernel not in KERNELS:
        raise ValueError(f"model.kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "torch":
        return "torch"
    usable = triton_available() and _kernels_importable()
    if kernel == "auto":
        return "triton" if device_type == "cuda" and usable else "torch"
    if not usable:
        raise ValueError(
            "model.kernel=triton needs a CUDA GPU with triton installed (or TRITON_INTERPRET=1); "
            "use model.kernel=auto or model.kernel=torch"
        )
    return "triton"


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def ttt_triton(
    layer: str,
    xq: Tensor, xk: Tensor, xv: Tensor, lr: Tensor, tok: Tensor, ln_w: Tensor, ln_b: Tensor,
    init_state: State,
    state: State | None = None,
    reset: Tensor | None = None,
    config: object | None = None,
) -> tuple[Tensor, State]:
    """The TTT inner loop in Triton; see :func:`tttexp.ops.reference.ttt_dual` for shapes and semantics.

    ``xk, xv`` are cast to ``xq``'s dtype (the dots run in it); float64 inputs and empty sequences go to the
    reference. The final state is float32. ``config``: launch settings (``LinearConfig`` / ``MLPConfig``; None:
    the defaults).
    """
    if layer not in TTT_LAYERS:
        raise ValueError(f"model.ttt_layer must be one of {TTT_LAYERS}, got {layer!r}")
    if xq.dtype not in (torch.float32, *LOWP) or xq.shape[2] == 0:
        return reference.ttt_dual(layer, xq, xk, xv, lr, tok, ln_w, ln_b, init_state, state=state, reset=reset)
    xq = xq.contiguous()
    xk = xk.to(xq.dtype).contiguous()
    xv = xv.to(xq.dtype).contiguous()
    lr, tok, ln_w, ln_b = lr.contiguous(), tok.contiguous(), ln_w.contiguous(), ln_b.contiguous()
    init_state = tuple(s.contiguous() for s in init_state)
    state = None if state is None else tuple(s.contiguous() for s in state)
    r8 = None if reset is None else reset.to(torch.uint8).contiguous()
    save = _needs_grad(xq, xk, xv, lr, tok, ln_w, ln_b, *init_state, *(state or ()))
    args = (xq, xk, xv, lr, tok, ln_w, ln_b, init_state, state, r8, save)
    if layer == "linear":
        from tttexp.ops.ttt_linear.op import ttt_linear_triton

        return ttt_linear_triton(*args, **({"config": config} if config is not None else {}))
    from tttexp.ops.ttt_mlp.op import ttt_mlp_triton

    return ttt_mlp_triton(*args, **({"config": config} if config is not None else {}))


def ttt(
    layer: str,
    xq: Tensor, xk: Tensor, xv: Tensor, lr: Tensor, tok: Tensor, ln_w: Tensor, ln_b: Tensor,
    init_state: State,
    state: State | None = None,
    reset: Tensor | None = None,
    kernel: str = "auto",
    settings: object | None = None,
) -> tuple[Tensor, State]:
    """The TTT inner loop over a whole sequence (signature of :func:`tttexp.ops.reference.ttt_dual`). ``settings``:
    the Triton kernels' launch settings (:func:`tttexp.ops.settings.kernel_settings`; None: their defaults)."""
    if resolve_kernel(kernel, xq.device.type) == "triton":
        return ttt_triton(layer, xq, xk, xv, lr, tok, ln_w, ln_b, init_state, state=state, reset=reset,
                          config=settings)
    return reference.ttt_dual(layer, xq, xk, xv, lr, tok, ln_w, ln_b, init_state, state=state, reset=reset)


def decode_step(
    layer: str,
    xq: Tensor, xk: Tensor, xv: Tensor, lr: Tensor, tok: Tensor, ln_w: Tensor, ln_b: Tensor,
    state: State, acc: State | None,
    kernel: str = "auto",
) -> tuple[Tensor, State]:
    """Tokens at positions ``tok`` ([m] token weights) of one mini-batch: decoding, and the short tail of a chunk.

    ``state`` is the mini-batch's start state, ``acc`` the accumulators of its earlier tokens (None: none yet).
    Returns ``(out in xq's dtype, accumulators)``; the caller applies
    :func:`tttexp.ops.reference.apply_accumulators` at the mini-batch boundary. One TTT-Linear token runs the
    Triton decode kernel when the kernel resolves to Triton and no gradient is needed; everything else runs the
    reference mini-batch step (with autograd).
    """
    one_linear_token = layer == "linear" and xq.shape[2] == 1 and not torch.is_grad_enabled()
    if one_linear_token and resolve_kernel(kernel, xq.device.type) == "triton":
        from tttexp.ops.ttt_linear.decode import linear_decode_step

        acc = acc if acc is not None else reference.zero_accumulators(state)
        return linear_decode_step(xq, xk, xv, lr.float(), tok.float(), ln_w.float(), ln_b.float(), state, acc)
    step = reference.MINIBATCH[layer]
    dt = reference.compute_dtype(xq)
    with torch.autocast(device_type=xq.device.type, enabled=False):
        out, acc = step(xq.to(dt), xk.to(dt), xv.to(dt), lr.to(dt), tok.to(dt), ln_w.to(dt), ln_b.to(dt), state, acc)
    return out.to(xq.dtype), acc
