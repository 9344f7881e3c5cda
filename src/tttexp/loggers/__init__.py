"""Run logging: the ``Logger`` interface, its backends (JSON lines, wandb, nothing), fan-out, the metric
catalogue and training-health warnings.

Importing this package never imports ``wandb``; only ``WandbLogger.start`` and the ``.wandb`` reader do.
"""

from tttexp.loggers.group import LoggerGroup
from tttexp.loggers.health import HealthMonitor, HealthWarning
from tttexp.loggers.jsonl import JsonlLogger, read_jsonl, read_metrics
from tttexp.loggers.protocol import Logger, NullLogger, Resume
from tttexp.loggers.wandb_logger import WandbLogger
from tttexp.loggers.wandb_records import RunRecord, find_run_files, read_records, read_run

__all__ = [
    "HealthMonitor",
    "HealthWarning",
    "JsonlLogger",
    "Logger",
    "LoggerGroup",
    "NullLogger",
    "Resume",
    "RunRecord",
    "WandbLogger",
    "find_run_files",
    "read_jsonl",
    "read_metrics",
    "read_records",
    "read_run",
]
