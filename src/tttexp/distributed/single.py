"""SingleDevice: one process on one device (the conservative, gpu_optimized and from_pretrained recipes)."""

from tttexp.distributed.strategy import Strategy


class SingleDevice(Strategy):
    """Everything in :class:`Strategy` on one device; no collectives."""
