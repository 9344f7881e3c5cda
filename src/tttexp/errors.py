"""The project's user-facing errors: each message is one line that says what to change.

Hydra-free, so that every layer (data, models, training, distributed) may raise them and the app prints them
as one line with its exit status.
"""


class TTTExpError(Exception):
    """Base of the errors the app reports as one line instead of a traceback."""


class ConfigError(TTTExpError, ValueError):
    """A config value or combination that cannot work."""


class CheckpointError(TTTExpError, RuntimeError):
    """A checkpoint that is missing, damaged, not a checkpoint, or from another run."""


class LayoutError(TTTExpError, ValueError):
    """The process/device layer cannot run here as configured."""


class TrainingStopped(TTTExpError, RuntimeError):
    """The run stopped on purpose (too many bad steps); a checkpoint of the last good weights exists."""
