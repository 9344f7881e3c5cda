"""The names a config may choose: the inner-loop implementation and the inner model."""

KERNELS = ("auto", "triton", "torch")
TTT_LAYERS = ("linear", "mlp")
