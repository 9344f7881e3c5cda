"""The process/device layer: one device, DDP or FSDP over a world of processes; the world read from the environment;
the elastic self-launch."""

from tttexp.distributed.ddp import DistributedDataParallel
from tttexp.distributed.fsdp import FullyShardedDataParallel
from tttexp.distributed.layout import ProcessLayout
from tttexp.distributed.single import SingleDevice

__all__ = ["DistributedDataParallel", "FullyShardedDataParallel", "ProcessLayout", "SingleDevice"]
