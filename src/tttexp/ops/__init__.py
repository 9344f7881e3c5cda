"""The TTT inner loop: one folder per op (``ttt_linear``, ``ttt_mlp``: PyTorch reference, hand-derived backward,
Triton kernels, ``torch.library`` op), the shared dual-form reference (``reference``), the kernels' launch settings
(``settings``), and ``dispatch``, the single entry that picks an implementation."""

from tttexp.ops.dispatch import decode_step, resolve_kernel, ttt
from tttexp.ops.names import KERNELS, TTT_LAYERS
from tttexp.ops.settings import kernel_settings

__all__ = ["KERNELS", "TTT_LAYERS", "decode_step", "kernel_settings", "resolve_kernel", "ttt"]
