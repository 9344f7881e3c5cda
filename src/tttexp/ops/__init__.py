"""The TTT inner loop: a PyTorch reference (``reference``) and Triton kernels, chosen by ``dispatch``."""

from tttexp.ops.dispatch import KERNELS, resolve_kernel, ttt

__all__ = ["KERNELS", "resolve_kernel", "ttt"]
