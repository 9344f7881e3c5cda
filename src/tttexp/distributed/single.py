"""SingleDevice: one process on one device (the conservative, gpu_optimized and from_pretrained recipes)."""

from dataclasses import dataclass

from tttexp.distributed.layout import LayoutConfig, ProcessLayout
from tttexp.errors import ConfigError


@dataclass
class SingleDeviceConfig(LayoutConfig):
    """``distributed=single`` (the default): no process group, so no backend, timeout, mesh or context split."""

    _target_: str = "tttexp.distributed.SingleDevice"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.nproc_per_node != 1:
            raise ConfigError(f"distributed.nproc_per_node={self.nproc_per_node}: distributed=single runs one "
                              "process; use distributed=ddp or distributed=fsdp for more")


class SingleDevice(ProcessLayout):
    """Everything in :class:`ProcessLayout` on one device; no collectives."""
