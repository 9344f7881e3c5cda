"""The app's config: the schemas registered in Hydra's ConfigStore, and the one check of a composed job.

Each group's keys, defaults and own checks are a dataclass beside what it builds: the data (data/config.py), the
model sources (models/build.py, models/pretrained.py), the process layouts (distributed/single.py, ddp.py, fsdp.py),
the optimizer (training/optimizer.py), the loop (training/config.py) and passkey retrieval (training/passkey.py).
Here :class:`TrainConfig` puts them together behind conf/train.yaml, and each option with keys of its own registers
its schema (``distributed_<option>_schema``; ``strategy_from_pretrained_schema`` retypes the model node), so a key
the chosen option's class does not take fails while the config is composed; preflight says so in one line.

:func:`validate` builds the job's configs from the composed values, which runs every section's checks
(``__post_init__``) once, and checks what spans groups: the data against the model's mini-batch, a context split
against heads and length, the long evaluations against memory, the resume path.
"""

from __future__ import annotations

from dataclasses import MISSING as NO_DEFAULT
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from tttexp.app.harness import HarnessConfig
from tttexp.app.security import check_config
from tttexp.configs import RESUME, choice, resume_fields
from tttexp.data.config import DataConfig
from tttexp.distributed.ddp import DDPConfig
from tttexp.distributed.fsdp import FSDPConfig
from tttexp.distributed.layout import LayoutConfig
from tttexp.distributed.single import SingleDeviceConfig
from tttexp.errors import ConfigError
from tttexp.models.build import FromScratchConfig
from tttexp.models.pretrained import FromBaseConfig
from tttexp.training import rundir
from tttexp.training.config import TrainerConfig
from tttexp.training.optimizer import OptimConfig
from tttexp.training.passkey import PasskeyConfig


@dataclass
class DataSchema(DataConfig):
    """The ``data`` group: :class:`tttexp.data.config.DataConfig` (each key, its default and its checks are written
    there, beside the DataModule it builds), its seed tied to the run's."""

    # the train/validation split and shuffling
    seed: int = field(default="${seed}", metadata=RESUME)  # type: ignore[assignment]


@dataclass
class LoggingConfig:
    """The logging backend (``conf/logging/wandb.yaml``, ``none.yaml``); metrics.jsonl is always written."""

    _target_: str = "tttexp.loggers.WandbLogger"  # WandbLogger | NullLogger (wandb never imported)
    project: str = "tttexp"  # wandb project
    run_name: str | None = None  # None: <model>-<ttt_layer>-<strategy>-<time>
    entity: str | None = None  # wandb team or user
    group: str | None = None  # None: the sweep's directory name under -m
    tags: list[str] = field(default_factory=list)  # wandb tags
    notes: str | None = None  # wandb notes
    mode: str = "auto"  # auto (online with credentials, else offline) | online | offline | disabled
    init_timeout: float = 60.0  # seconds wandb.init may take before training goes on without it

    def __post_init__(self) -> None:
        choice("logging._target_", self._target_, ("tttexp.loggers.WandbLogger", "tttexp.loggers.NullLogger"))
        choice("logging.mode", self.mode, ("auto", "online", "offline", "disabled"))


@dataclass
class StudyConfig:
    """The comparison study (``experiment=compare``): each job is one arm (``arm=<name>``: conf/arm/*.yaml, a named
    set of model overrides) at one learning rate of the grid; the sweep's end writes compare.csv and the figures."""

    arm: str | None = None  # this job's arm, set by conf/arm/*.yaml; None outside a study
    select_by: str = "val_loss"  # how the best LR of an arm is chosen: val_loss (final validation loss)

    def __post_init__(self) -> None:
        if self.select_by != "val_loss":
            raise ConfigError(f"study.select_by={self.select_by!r} is not allowed; choose val_loss")


@dataclass
class TrainConfig:
    """The whole config of a job (conf/train.yaml's schema; eval.yaml adds nothing of its own)."""

    model: FromScratchConfig = field(default_factory=FromScratchConfig)  # strategy=from_pretrained: FromBaseConfig
    data: DataSchema = field(default_factory=DataSchema)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    distributed: LayoutConfig = MISSING  # the option's own schema: SingleDeviceConfig | DDPConfig | FSDPConfig
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    passkey: PasskeyConfig = field(default_factory=PasskeyConfig)  # passkey retrieval (training/passkey.py)
    study: StudyConfig = field(default_factory=StudyConfig)  # the comparison study's labels
    strategy: str = "custom"  # the recipe's name (strategy=...), set by conf/strategy/*.yaml; for logs and records
    seed: int = field(default=0, metadata=RESUME)  # seeds every generator (offset by rank) and the data split
    device: str = "auto"  # auto | cpu | cuda
    resume: str | None = None  # None | auto (newest valid checkpoint of the run directory) | a checkpoint path
    experiment_name: str = "default"  # set by conf/experiment/*.yaml
    checkpoint: str | None = None  # for `python -m tttexp.eval`: a step-*.pt file or a save_pretrained directory
    harness: HarnessConfig = field(default_factory=HarnessConfig)  # for `python -m tttexp.eval`: lm_eval tasks


# --------------------------------------------------------------------------------------------------------------
# One schema per option that has keys of its own
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """An option whose class takes keys of its own: ``group=name`` picks it; its schema types ``node``."""

    group: str
    name: str
    schema: type
    node: str = ""  # the config node it types; "" for the group's own node

    @property
    def pick(self) -> str:
        return f"{self.group}={self.name}"

    @property
    def schema_name(self) -> str:
        return f"{self.group}_{self.name}_schema"

    @property
    def target(self) -> str:
        return {f.name: f.default for f in fields(self.schema)}["_target_"]


OPTIONS = (
    Option("distributed", "single", SingleDeviceConfig),
    Option("distributed", "ddp", DDPConfig),
    Option("distributed", "fsdp", FSDPConfig),
    Option("strategy", "from_pretrained", FromBaseConfig, node="model"),
)


def register_configs() -> None:
    """The schema behind conf/train.yaml, and each option's schema as ``<group>_<option>_schema``, which the option's
    YAML file lists first in its defaults. They are stored outside the groups: a schema is not an option to pick
    (``--help`` and shell completion list options only)."""
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    for option in OPTIONS:
        if not option.node:
            store.store(name=option.schema_name, node=option.schema)
        else:  # a recipe (package _global_): it retypes a section of the whole config
            store.store(name=option.schema_name,
                        node={option.node: _retype(option.schema, _section_type(option.node))})


def _section_type(name: str) -> type | None:
    """The dataclass a :class:`TrainConfig` section has by default (None: none, or chosen by the group's option)."""
    factory = {f.name: f.default_factory for f in fields(TrainConfig)}.get(name)
    return factory if isinstance(factory, type) and is_dataclass(factory) else None


def _retype(schema: type, base: type) -> DictConfig:
    """``schema`` (a subclass of ``base``) as a node that, merged onto a ``base`` node, gives it ``schema``'s type and
    its own keys but keeps the values set before (a size preset's): inherited fields with unchanged defaults are
    left missing, and a missing value does not overwrite."""
    node = OmegaConf.structured(schema)
    inherited = {f.name: _default(f) for f in fields(base)}
    for spec in fields(schema):
        if spec.name in inherited and _default(spec) == inherited[spec.name]:
            node[spec.name] = MISSING
    return node


def _default(spec: Any) -> Any:
    return spec.default_factory() if spec.default_factory is not NO_DEFAULT else spec.default


def schemas_of(section: str) -> list[type]:
    """Every schema a section may have: its type in :class:`TrainConfig`, then the options' schemas."""
    found = [o.schema for o in OPTIONS if (o.node or o.group) == section]
    default = _section_type(section)
    return ([default] if default is not None and default not in found else []) + found


def option_of(section: str, config: Any) -> str | None:
    """The option a built section comes from (``distributed`` -> ``single``), None where no option has its type."""
    return next((o.name for o in OPTIONS if (o.node or o.group) == section and type(config) is o.schema), None)


def refusal(section: str, key: str, value: Any, current: str) -> str | None:
    """The line for ``section.key=value`` under the class ``current``, which does not take the key, when another
    option's class does: ``... does not take it; only X does (group=option)``."""
    takers = [o for o in OPTIONS if (o.node or o.group) == section and key in {f.name for f in fields(o.schema)}]
    if not takers:
        return None
    names = " and ".join(o.target for o in takers)
    picks = ", ".join(o.pick for o in takers)
    return (f"{section}.{key}={value}: {current} does not take it; only {names} "
            f"{'does' if len(takers) == 1 else 'do'} ({picks})")


# --------------------------------------------------------------------------------------------------------------
# The fingerprint: the fields marked RESUME
# --------------------------------------------------------------------------------------------------------------


def _resume_keys() -> dict[str, Any]:
    """Each RESUME-marked key with the default it has where the chosen option does not take it (a scratch model's
    ``model.base_model`` is None), top-level keys first."""
    keys = dict(resume_fields(TrainConfig))
    for spec in fields(TrainConfig):
        for schema in schemas_of(spec.name):
            for name, default in resume_fields(schema).items():
                keys.setdefault(f"{spec.name}.{name}", default)
    return keys


RESUME_KEYS = _resume_keys()


def fingerprint(cfg: Any, world_size: int = 1) -> dict[str, Any]:
    """The values a resume must match (training/rundir.py), from a composed or a built config."""
    return rundir.fingerprint(cfg, RESUME_KEYS, world_size=world_size)


# --------------------------------------------------------------------------------------------------------------
# The check of a job
# --------------------------------------------------------------------------------------------------------------


def validate(cfg: DictConfig) -> TrainConfig:
    """Build the job's configs from the composed ``cfg`` (each section's own checks run as it is built) and check
    what spans groups; a problem raises :class:`ConfigError` (one line). Returns the built config, which the job
    passes on instead of checking again."""
    check_config(cfg)  # exact _target_ names only, no code-loading switch (app/security.py)
    _no_unknown_keys(cfg)
    job = TrainConfig(**{spec.name: _build(cfg, spec.name) for spec in fields(TrainConfig)})
    choice("device", job.device, ("auto", "cpu", "cuda"))
    _data_fits_the_model(job)
    _context_split(job)
    _long_context_fits(job)
    _resume_exists(job.resume)
    return job


def _build(cfg: DictConfig, name: str) -> Any:
    """A section as its dataclass (its ``__post_init__`` checks run now), a top-level value as it is."""
    value = cfg[name]
    return OmegaConf.to_object(value) if isinstance(value, DictConfig) else value


def _no_unknown_keys(cfg: DictConfig) -> None:
    """Keys added with ``+key=value`` that the section's class does not take would be silently ignored: refuse."""
    known_root = {spec.name for spec in fields(TrainConfig)} | {"hydra", "hparams_search"}
    for key in cfg:
        if key not in known_root:
            raise ConfigError(f"{key}: no such config key; the top-level keys are {', '.join(sorted(known_root))}")
    for spec in fields(TrainConfig):
        node = cfg[spec.name]
        if not isinstance(node, DictConfig):
            continue
        schema = OmegaConf.get_type(node)
        taken = {f.name for f in fields(schema)} if isinstance(schema, type) and schema is not dict else set(node)
        for key in node:
            if key not in taken:
                current = node.get("_target_", schema.__name__)
                raise ConfigError(refusal(spec.name, str(key), node[key], current)
                                  or f"{spec.name}.{key}: no such config key")


def _data_fits_the_model(job: TrainConfig) -> None:
    """Sequences the TTT layers cannot take: shorter than one inner mini-batch or the causal conv window, or a
    state-passing chunk that does not end on a mini-batch boundary."""
    m, d = job.model, job.data
    if "ttt" in m.mixers:
        if d.seq_len < m.mini_batch_size:
            raise ConfigError(
                f"data.seq_len={d.seq_len} is shorter than one TTT mini-batch (model.mini_batch_size="
                f"{m.mini_batch_size}): the inner loop would never see a full mini-batch; use data.seq_len >= "
                f"{m.mini_batch_size}"
            )
        if m.backbone == "mamba" and d.seq_len < m.conv_kernel:
            raise ConfigError(
                f"data.seq_len={d.seq_len} is shorter than the causal conv window (model.conv_kernel={m.conv_kernel});"
                f" use data.seq_len >= {m.conv_kernel}"
            )
    if d.stream and d.seq_len % m.mini_batch_size:
        raise ConfigError(
            f"data.stream=true needs data.seq_len ({d.seq_len}) to be a multiple of model.mini_batch_size "
            f"({m.mini_batch_size}), so that each chunk ends on an inner mini-batch boundary"
        )


def _context_split(job: TrainConfig) -> None:
    """``distributed.context_parallel`` against the heads and the sequence (a converted base brings its own heads):
    the same line as at run time, before any process starts."""
    split = getattr(job.distributed, "context_parallel", 1)
    m = job.model
    if split > 1 and not isinstance(m, FromBaseConfig):
        from tttexp.distributed.context import check_split

        try:
            check_split(split, m.num_attention_heads, m.num_key_value_heads or m.num_attention_heads,
                        job.data.seq_len, m.mini_batch_size if "ttt" in m.mixers else 1)
        except ValueError as err:
            raise ConfigError(str(err)) from None


def _long_context_fits(job: TrainConfig) -> None:
    """Whether the long evaluations (loss by position, passkey retrieval) fit in memory at the configured batch."""
    from tttexp.training.long_context import check_fits

    m, d, t = job.model, job.data, job.trainer
    common = {"hidden": m.hidden_size, "vocab": m.vocab_size or d.vocab_size, "heads": m.num_attention_heads,
              "device": job.device}
    checks = []
    cp = getattr(job.distributed, "context_parallel", 1)  # > 1: each rank evaluates its slice of every sequence
    step = cp * (m.mini_batch_size if "ttt" in m.mixers else 1)
    if t.position_eval_sequences > 0:
        length = t.position_eval_len or 4 * d.seq_len
        if cp > 1 and length % step:
            raise ConfigError(f"trainer.position_eval_len={length} must be a multiple of {step} under "
                              f"distributed.context_parallel={cp} (each rank evaluates whole mini-batches)")
        checks.append(("trainer.position_eval_len", d.batch_size, length // cp))
    if job.passkey.enabled:  # the prompt's longest prefix of whole mini-batches is split, the rest runs whole
        longest = max(job.passkey.lengths)
        checks.append(("passkey.lengths", job.passkey.trials, longest if cp == 1 else longest // cp + step))
    for what, batch, length in checks:
        problem = check_fits(what=what, batch=batch, length=length, **common)
        if problem:
            raise ConfigError(problem)


def _resume_exists(resume: str | None) -> None:
    if resume not in (None, "auto") and not str(resume).strip():
        raise ConfigError("resume must be null, auto or a checkpoint path")
    if resume not in (None, "auto") and not Path(str(resume)).expanduser().exists():
        raise ConfigError(f"resume={resume}: no such checkpoint; give an existing step-*.pt file, or resume=auto")
