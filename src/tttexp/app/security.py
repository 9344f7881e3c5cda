"""What a config may make the app run: an explicit list of callables, and no switch that loads code.

Hydra builds every ``_target_`` it meets (the job's groups, ``hydra.callbacks``, the launcher and the sweeper),
and Python's logging setup builds every handler ``class`` and ``()`` factory of ``hydra.job_logging``. A config
from a shared YAML or a command line could therefore call anything importable (``torch.load`` on a pickle, for
one). Here the whole composed config, the ``hydra`` node included, is checked against exact names: the app's
own builders, and the Hydra plugins the shipped configs select. No prefix is trusted.

Arguments that turn on code loading are refused wherever they appear: ``weights_only: false`` (unpickling) and
``trust_remote_code: true`` (code shipped with a model). The one opt-in is ``model.trust_remote_code=true``,
read by the model source ``FromBase`` for a base whose code must run. Environment variables that make a started
process load other code (``LD_PRELOAD``, ``PYTHONPATH``, ...) may not be set through ``hydra.job.env_set``:
the self-launched workers would inherit them.
"""

from __future__ import annotations

from typing import Any

from omegaconf import Container, DictConfig, ListConfig

from tttexp.errors import ConfigError

# Every callable a config may name, exactly.
ALLOWED_TARGETS = frozenset({
    # the app's own pieces
    "tttexp.models.FromScratch",
    "tttexp.models.pretrained.FromBase",
    "tttexp.data.DataModule",
    "tttexp.distributed.SingleDevice",
    "tttexp.distributed.DistributedDataParallel",
    "tttexp.distributed.FullyShardedDataParallel",
    "tttexp.loggers.WandbLogger",
    "tttexp.loggers.NullLogger",
    "tttexp.app.sweep_summary.SweepSummary",
    "tttexp.app.study.StudyReport",
    # Hydra's own launcher and sweeper, and the plugins the shipped configs select
    "hydra._internal.core_plugins.basic_launcher.BasicLauncher",
    "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
    "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",
    "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
    "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper",
    # the samplers the Optuna sweeper plugin offers (hydra/sweeper/sampler=...)
    "optuna.samplers.TPESampler",
    "optuna.samplers.RandomSampler",
    "optuna.samplers.CmaEsSampler",
    "optuna.samplers.NSGAIISampler",
    "optuna.samplers.MOTPESampler",
    "optuna.samplers.GridSampler",
})

# Handler classes Python's logging may build from hydra.job_logging / hydra.hydra_logging.
ALLOWED_LOG_CLASSES = frozenset({
    "logging.StreamHandler",
    "logging.FileHandler",
    "logging.NullHandler",
    "logging.handlers.RotatingFileHandler",
    "logging.handlers.WatchedFileHandler",
})
ALLOWED_LOG_EXTERNALS = frozenset({"ext://sys.stdout", "ext://sys.stderr"})

OPT_IN = "model.trust_remote_code"  # the single documented switch that lets a base model's own code run
_CODE_LOADING = {"weights_only": False, "trust_remote_code": True}  # key -> the value that loads code
_LOADER_ENV = ("LD_", "DYLD_")
_INTERPRETER_ENV = frozenset({"PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME", "PYTHONUSERBASE", "PYTHONEXECUTABLE",
                              "PYTHONSAFEPATH", "BASH_ENV", "ENV"})


def check_config(cfg: Any, path: str = "") -> None:
    """Refuse (:class:`ConfigError`, one line) any target, logging class or code-loading switch not allowed.

    ``cfg`` is a composed config (with or without its ``hydra`` node) or any node of one; ``path`` is the
    node's dotted name (``"hydra"`` for ``HydraConfig.get()``).
    """
    _walk(cfg, path)


def _walk(node: Any, path: str) -> None:
    if isinstance(node, DictConfig):
        if node._is_none() or node._is_missing():
            return
        for key in node:
            _check_entry(node, str(key), path)
    elif isinstance(node, ListConfig):
        if node._is_none() or node._is_missing():
            return
        for index in range(len(node)):
            child = _child(node, index)
            if isinstance(child, Container):
                _walk(child, f"{path}[{index}]")


def _check_entry(node: DictConfig, key: str, path: str) -> None:
    full = f"{path}.{key}" if path else key
    raw = node._get_node(key)
    if key == "_target_":
        _check_target(full, raw)
        return
    logging_node = path.startswith(("hydra.job_logging", "hydra.hydra_logging"))
    if logging_node and key in ("class", "()"):
        _check_log_class(full, raw)
        return
    value = _child(node, key)
    if key in _CODE_LOADING and full != OPT_IN and _as_bool(value) is _CODE_LOADING[key]:
        raise ConfigError(
            f"{full}={str(value).lower()} would run code from the files it loads; refused (the only opt-in is "
            f"{OPT_IN}=true, for a pretrained base whose own code must run)"
        )
    if logging_node and isinstance(value, str) and value.startswith("ext://") and value not in ALLOWED_LOG_EXTERNALS:
        raise ConfigError(f"{full}={value}: logging may refer only to {', '.join(sorted(ALLOWED_LOG_EXTERNALS))}")
    if path == "hydra.job.env_set" and (key.startswith(_LOADER_ENV) or key in _INTERPRETER_ENV):
        raise ConfigError(f"{full}: {key} makes started processes load other code; set it outside the config")
    if isinstance(value, Container):
        _walk(value, full)


def _check_target(full: str, raw: Any) -> None:
    if raw is None or raw._is_none():
        return
    if raw._is_interpolation():
        raise ConfigError(f"{full}={raw._value()}: a _target_ must be written out, not interpolated")
    value = raw._value()
    if value not in ALLOWED_TARGETS:
        raise ConfigError(
            f"{full}={value!r} is not a callable this app builds; configs may name only its own pieces "
            f"(tttexp.app.security.ALLOWED_TARGETS)"
        )


def _check_log_class(full: str, raw: Any) -> None:
    value = raw._value() if raw is not None else None
    if raw is not None and raw._is_interpolation():
        raise ConfigError(f"{full}={value}: a logging class must be written out, not interpolated")
    if value not in ALLOWED_LOG_CLASSES:
        raise ConfigError(f"{full}={value!r}: logging may build only {', '.join(sorted(ALLOWED_LOG_CLASSES))}")


def _child(node: Container, key: Any) -> Any:
    """A child with interpolations resolved where they can be (``oc.create`` may build a whole node);
    one that cannot be resolved yet (``${hydra:...}`` before the run) is kept as written."""
    raw = node._get_node(key)
    if raw is None:
        return None
    if isinstance(raw, Container) and not raw._is_interpolation():
        return raw
    try:
        return node[key]
    except Exception:  # noqa: BLE001 - an unresolvable value cannot name a target; keep the raw text
        return raw._value()


def _as_bool(value: Any) -> bool | None:
    if isinstance(value, (bool, int)):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None
