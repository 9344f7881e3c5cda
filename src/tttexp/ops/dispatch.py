"""Pick the implementation of the TTT inner loop: the PyTorch reference or a Triton kernel."""

from __future__ import annotations

import os

from torch import Tensor

from tttexp.ops import reference
from tttexp.ops.reference import State

KERNELS = ("auto", "triton", "torch")


def triton_available() -> bool:
    """True when Triton can run here: a CUDA device, or the interpreter (``TRITON_INTERPRET=1``)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    import torch

    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_kernel(kernel: str, device_type: str) -> str:
    """Map ``model.kernel`` to the implementation used on ``device_type``: ``"triton"`` or ``"torch"``."""
    if kernel not in KERNELS:
        raise ValueError(f"model.kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "torch":
        return "torch"
    has_triton_op = _triton_op() is not None
    if kernel == "auto":
        return "triton" if device_type == "cuda" and has_triton_op and triton_available() else "torch"
    if not (has_triton_op and triton_available()):
        raise ValueError(
            "model.kernel=triton needs a CUDA GPU with triton installed (or TRITON_INTERPRET=1); "
            "use model.kernel=auto or model.kernel=torch"
        )
    return "triton"


def _triton_op():
    """The Triton entry point, or None while it is not available in this install."""
    try:
        from tttexp.ops.triton_ttt import ttt_triton
    except ImportError:
        return None
    return ttt_triton


def ttt(
    layer: str,
    xq: Tensor, xk: Tensor, xv: Tensor, lr: Tensor, tok: Tensor, ln_w: Tensor, ln_b: Tensor,
    init_state: State,
    state: State | None = None,
    reset: Tensor | None = None,
    kernel: str = "auto",
) -> tuple[Tensor, State]:
    """The TTT inner loop over a whole sequence (signature of :func:`tttexp.ops.reference.ttt_dual`)."""
    if resolve_kernel(kernel, xq.device.type) == "triton":
        return _triton_op()(layer, xq, xk, xv, lr, tok, ln_w, ln_b, init_state, state=state, reset=reset)
    return reference.ttt_dual(layer, xq, xk, xv, lr, tok, ln_w, ln_b, init_state, state=state, reset=reset)
