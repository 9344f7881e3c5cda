"""TTT-Linear: the mini-batch reference (``reference``), its hand-derived backward (``math``), the Triton kernels
(``triton``), the ``torch.library`` op around them (``op``) and the one-token decode kernel (``decode``)."""
