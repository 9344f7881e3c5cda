"""Training recipes at the process level: single device or DDP."""

from tttexp.strategies.base import Strategy, StrategyError
from tttexp.strategies.ddp import DistributedDataParallel
from tttexp.strategies.single import SingleDevice

__all__ = ["DistributedDataParallel", "SingleDevice", "Strategy", "StrategyError"]
