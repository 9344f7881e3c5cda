"""TTT-MLP (hidden 4F, gelu_tanh): the mini-batch reference (``reference``), its hand-derived backward (``math``),
the Triton kernels (``triton``) and the ``torch.library`` op around them (``op``)."""
