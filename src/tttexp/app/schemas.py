"""Structured-config schemas for the Hydra app, registered in Hydra's ConfigStore.

Every YAML file under ``conf/`` is merged onto one of these dataclasses, so a misspelt key or a value of the
wrong type fails while the config is composed, before anything is built. Value checks that a type cannot express
(positive sizes, known names, combinations) live in :func:`validate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from tttexp.app.harness import HarnessConfig
from tttexp.app.security import check_config
from tttexp.data.config import DataConfig
from tttexp.errors import ConfigError
from tttexp.models.configuration import BACKBONES, KERNELS, MIXERS, TTT_LAYERS
from tttexp.training.config import OptimConfig, TrainerConfig
from tttexp.training.passkey import PasskeyConfig, check_settings

# --------------------------------------------------------------------------------------------------------------
# One schema per group. A recipe (conf/strategy/*.yaml) only sets values in these groups; what runs is what
# `--cfg job` shows.
# --------------------------------------------------------------------------------------------------------------


# A field read by one option of its group only (``metadata={"only": (target, how to pick it)}``): under another
# option, a value other than its default is refused (app/schemas.py: _no_unknown_keys).
_ONLY_FROM_BASE = {"only": ("tttexp.models.pretrained.FromBase", "strategy=from_pretrained")}
_ONLY_FSDP = {"only": ("tttexp.distributed.FullyShardedDataParallel", "distributed=fsdp")}


@dataclass
class ModelConfig:
    """The model and where its weights come from (``conf/model/*.yaml``: the paper's sizes plus ``tiny``).

    ``_target_`` is the model source: ``tttexp.models.FromScratch`` (fresh weights) or
    ``tttexp.models.pretrained.FromBase`` (a pretrained Llama-family LM converted to TTT; the base dictates the
    sizes and the tokenizer). The TTT options (``ttt_layer``, ``kernel``, ``mini_batch_size``, ``ttt_base_lr``,
    ``conv_kernel``) are ignored by attention layers.
    """

    _target_: str = "tttexp.models.FromScratch"
    name: str = "tiny"  # the size preset's name, for logs and run names
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 352  # SwiGLU width
    mixer: str = "ttt"  # every layer's sequence mixer: ttt | attention (the Transformer++ baseline)
    mixer_types: list[str] | None = None  # per-layer mixers for hybrids, e.g. [ttt,attention,ttt,attention]
    num_key_value_heads: int | None = None  # attention layers' K/V heads (GQA); None: num_attention_heads
    ttt_layer: str = "linear"  # linear | mlp
    backbone: str = "mamba"  # mamba (the paper's block: shared Q/K, convs, output gate) | transformer
    kernel: str = "auto"  # auto (Triton on CUDA, else torch) | triton | torch; the model resolves auto
    mini_batch_size: int = 16  # K: tokens per inner gradient step
    ttt_base_lr: float | None = None  # None: 1.0 for linear, 0.1 for mlp
    rope_theta: float = 10000.0
    conv_kernel: int = 4
    initializer_range: float = 0.02
    vocab_size: int | None = None  # None: taken from the tokenizer
    gradient_checkpointing: bool = False  # recompute each block in the backward to save memory
    # FromBase: hub id | local directory | .gguf file | smollm2 (offline package)
    base_model: str | None = field(default=None, metadata=_ONLY_FROM_BASE)
    # FromBase: all | every_other | comma-separated layer indices
    convert_layers: str = field(default="all", metadata=_ONLY_FROM_BASE)
    freeze: bool = field(default=False, metadata=_ONLY_FROM_BASE)  # FromBase: train only the new TTT parameters
    # FromBase: run code shipped with the base (the only opt-in for that)
    trust_remote_code: bool = field(default=False, metadata=_ONLY_FROM_BASE)


@dataclass
class DataSchema(DataConfig):
    """The ``data`` group: :class:`tttexp.data.config.DataConfig` (each key, its default and its checks are written
    there, beside the DataModule it builds), its seed tied to the run's."""

    seed: int = "${seed}"  # type: ignore[assignment]  # the train/validation split and shuffling


@dataclass
class DistributedConfig:
    """The process/device layer (``conf/distributed/single.yaml``, ``ddp.yaml``, ``fsdp.yaml``): what is
    instantiated as the strategy."""

    # SingleDevice | DistributedDataParallel | FullyShardedDataParallel
    _target_: str = "tttexp.distributed.SingleDevice"
    nproc_per_node: Any = 1  # processes on this machine: an int or "auto" (one per GPU); DDP/FSDP self-launch
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    timeout_s: int = 600  # collective timeout
    # FSDP: replicas of the sharded model (HSDP: a replicate x shard mesh); must divide the world
    replicate: int = field(default=1, metadata=_ONLY_FSDP)
    # FSDP: free gathered parameters after each block's forward (less memory)
    reshard_after_forward: bool = field(default=True, metadata=_ONLY_FSDP)
    checkpoint: str = "auto"  # auto (dcp under FSDP, pt otherwise) | dcp (sharded directory) | pt (one file)
    async_checkpoint: bool = False  # dcp: write shards in the background; marked complete when written
    context_parallel: int = 1  # DDP/FSDP: ranks that split each sequence (heads and seq_len must divide)


@dataclass
class LoggingConfig:
    """The logging backend (``conf/logging/wandb.yaml``, ``none.yaml``); metrics.jsonl is always written."""

    _target_: str = "tttexp.loggers.WandbLogger"  # WandbLogger | NullLogger (wandb never imported)
    project: str = "tttexp"  # wandb project
    run_name: str | None = None  # None: <model>-<ttt_layer>-<recipe>-<time>
    entity: str | None = None  # wandb team or user
    group: str | None = None  # None: the sweep's directory name under -m
    tags: list[str] = field(default_factory=list)  # wandb tags
    notes: str | None = None  # wandb notes
    mode: str = "auto"  # auto (online with credentials, else offline) | online | offline | disabled
    init_timeout: float = 60.0  # seconds wandb.init may take before training goes on without it


# --------------------------------------------------------------------------------------------------------------
# The whole config
# --------------------------------------------------------------------------------------------------------------


@dataclass
class StudyConfig:
    """The comparison study (``experiment=compare``): each job is one arm (``arm=<name>``: conf/arm/*.yaml, a named
    set of model overrides) at one learning rate of the grid; the sweep's end writes compare.csv and the figures."""

    arm: str | None = None  # this job's arm, set by conf/arm/*.yaml; None outside a study
    select_by: str = "val_loss"  # how the best LR of an arm is chosen: val_loss (final validation loss)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataSchema = field(default_factory=DataSchema)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    passkey: PasskeyConfig = field(default_factory=PasskeyConfig)  # passkey retrieval (training/passkey.py)
    study: StudyConfig = field(default_factory=StudyConfig)  # the comparison study's labels
    recipe: str = "custom"  # the recipe's name (strategy=...), set by conf/strategy/*.yaml; a label for logs
    seed: int = 0  # seeds every generator (offset by rank) and the data split
    device: str = "auto"  # auto | cpu | cuda
    resume: str | None = None  # None | auto (newest valid checkpoint of the run directory) | a checkpoint path
    experiment_name: str = "default"  # set by conf/experiment/*.yaml
    checkpoint: str | None = None  # for `python -m tttexp.eval`: a step-*.pt file or a save_pretrained directory
    harness: HarnessConfig = field(default_factory=HarnessConfig)  # for `python -m tttexp.eval`: lm_eval tasks


def register_configs() -> None:
    """The schema behind conf/train.yaml (the groups merge onto its typed fields; no schema is a group option)."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


# --------------------------------------------------------------------------------------------------------------
# Value checks
# --------------------------------------------------------------------------------------------------------------

def _choice(path: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{path}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")


def _positive(path: str, value: Any, allow_zero: bool = False) -> None:
    if value is None or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{path}={value!r} must be {bound}")


FLOAT32_MAX = 3.4028234663852886e38  # optimizer values live in float32 tensors

_SECTIONS = {"model": ModelConfig, "data": DataSchema, "optim": OptimConfig, "trainer": TrainerConfig,
             "distributed": DistributedConfig, "logging": LoggingConfig,
             "passkey": PasskeyConfig, "study": StudyConfig, "harness": HarnessConfig}
PROCESS_LAYERS = ("tttexp.distributed.SingleDevice", "tttexp.distributed.DistributedDataParallel",
                  "tttexp.distributed.FullyShardedDataParallel")
MODEL_SOURCES = ("tttexp.models.FromScratch", "tttexp.models.pretrained.FromBase")
LOGGERS = ("tttexp.loggers.WandbLogger", "tttexp.loggers.NullLogger")


def _no_unknown_keys(cfg: DictConfig) -> None:
    """Keys added with ``+key=value`` that no schema knows would be silently ignored: refuse them."""
    known_root = set(TrainConfig.__dataclass_fields__) | {"hydra", "hparams_search"}
    for key in cfg:
        if key not in known_root:
            raise ConfigError(f"{key}: no such config key; the top-level keys are {', '.join(sorted(known_root))}")
    for section, schema in _SECTIONS.items():
        for key in cfg[section]:
            if key not in schema.__dataclass_fields__:
                raise ConfigError(f"{section}.{key}: no such config key")
        for name, spec in schema.__dataclass_fields__.items():
            only = spec.metadata.get("only")
            if only and cfg[section]._target_ != only[0] and cfg[section][name] != spec.default:
                raise ConfigError(
                    f"{section}.{name}={cfg[section][name]}: {cfg[section]._target_} does not take it; only "
                    f"{only[0]} does ({only[1]})"
                )


def _model_fits(m: DictConfig, d: DictConfig) -> None:
    """Shapes the layers cannot take, refused before anything is built (a scratch model's sizes are the config's;
    a converted base brings its own)."""
    if not m._target_.endswith("FromBase"):
        head_dim = m.hidden_size // m.num_attention_heads
        if head_dim % 2:
            raise ConfigError(
                f"model.hidden_size={m.hidden_size} / model.num_attention_heads={m.num_attention_heads} gives a head "
                f"dim of {head_dim}; RoPE rotates pairs of features, so the head dim must be even"
            )
    mixers = list(m.mixer_types) if m.mixer_types is not None else [m.mixer]
    if "ttt" not in mixers:
        return
    if d.seq_len < m.mini_batch_size:
        raise ConfigError(
            f"data.seq_len={d.seq_len} is shorter than one TTT mini-batch (model.mini_batch_size={m.mini_batch_size}):"
            f" the inner loop would never see a full mini-batch; use data.seq_len >= {m.mini_batch_size}"
        )
    if m.backbone == "mamba" and d.seq_len < m.conv_kernel:
        raise ConfigError(
            f"data.seq_len={d.seq_len} is shorter than the causal conv window (model.conv_kernel={m.conv_kernel}); "
            f"use data.seq_len >= {m.conv_kernel}"
        )


def validate(cfg: DictConfig) -> None:
    """Check values and combinations that the schema's types cannot; raise :class:`ConfigError` (one line)."""
    check_config(cfg)  # exact _target_ names only, no code-loading switch (app/security.py)
    _no_unknown_keys(cfg)
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.trainer
    _long_context_checks(cfg)
    _choice("model.ttt_layer", m.ttt_layer, TTT_LAYERS)
    _choice("model.backbone", m.backbone, BACKBONES)
    _choice("model.kernel", m.kernel, KERNELS)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "mini_batch_size",
                "conv_kernel"):
        _positive(f"model.{key}", m[key])
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(
            f"model.hidden_size={m.hidden_size} must be divisible by model.num_attention_heads={m.num_attention_heads}"
        )
    _choice("data.source", d.source, ("shipped", "text_files", "hf"))
    _positive("data.seq_len", d.seq_len)
    _positive("data.batch_size", d.batch_size)
    _positive("data.vocab_size", d.vocab_size)
    if not 0.0 < d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={d.val_fraction} must be between 0 and 1")
    if d.source == "text_files" and not d.paths:
        raise ConfigError("data.source=text_files needs data.paths=[file_or_dir,...]")
    if d.source == "hf" and not d.hf_dataset:
        raise ConfigError("data.source=hf needs data.hf_dataset=<hub dataset name>")
    _positive("optim.lr", o.lr)
    for key in ("lr", "weight_decay", "eps"):
        if not math.isfinite(o[key]) or abs(o[key]) > FLOAT32_MAX:
            raise ConfigError(f"optim.{key}={o[key]!r} is outside float32's range (up to {FLOAT32_MAX:.3g})")
    _positive("optim.weight_decay", o.weight_decay, allow_zero=True)
    _positive("optim.warmup_steps", o.warmup_steps, allow_zero=True)
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio={o.min_lr_ratio} must be between 0 and 1")
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError(f"optim.betas={list(o.betas)} must be two numbers in [0, 1)")
    _positive("trainer.max_steps", t.max_steps)
    _positive("trainer.grad_accum_steps", t.grad_accum_steps)
    _positive("trainer.log_every", t.log_every)
    for key in ("eval_every", "ckpt_every", "keep_last"):
        _positive(f"trainer.{key}", t[key], allow_zero=True)
    _choice("trainer.progress", t.progress, ("auto", "bar", "lines", "none"))
    _choice("device", cfg.device, ("auto", "cpu", "cuda"))
    _choice("trainer.precision", t.precision, ("fp32", "bf16"))
    _choice("trainer.on_cpu", t.on_cpu, ("fallback", "error"))
    _positive("trainer.max_bad_steps", t.max_bad_steps)
    _positive("trainer.inference_every", t.inference_every, allow_zero=True)
    _choice("model.mixer", m.mixer, MIXERS)
    if m.mixer_types is not None:
        for i, kind in enumerate(m.mixer_types):
            _choice(f"model.mixer_types[{i}]", kind, MIXERS)
        if len(m.mixer_types) != m.num_hidden_layers and m.base_model is None:
            raise ConfigError(f"model.mixer_types lists {len(m.mixer_types)} layers but model.num_hidden_layers="
                              f"{m.num_hidden_layers}; give one mixer per layer")
    _choice("model._target_", m._target_, MODEL_SOURCES)
    if m._target_.endswith("FromBase") and not m.base_model:
        raise ConfigError("model._target_=tttexp.models.pretrained.FromBase needs model.base_model "
                          "(a hub id, a directory, a .gguf file or smollm2)")
    _model_fits(m, d)
    if d.stream and d.seq_len % m.mini_batch_size:
        raise ConfigError(
            f"data.stream=true needs data.seq_len ({d.seq_len}) to be a multiple of model.mini_batch_size "
            f"({m.mini_batch_size}), so that each chunk ends on an inner mini-batch boundary"
        )
    _choice("logging._target_", cfg.logging._target_, LOGGERS)
    _choice("logging.mode", cfg.logging.mode, ("auto", "online", "offline", "disabled"))
    _choice("distributed._target_", cfg.distributed._target_, PROCESS_LAYERS)
    nproc = cfg.distributed.nproc_per_node
    if not (nproc == "auto" or (isinstance(nproc, int) and nproc > 0)):
        raise ConfigError(f"distributed.nproc_per_node={nproc!r} must be a positive integer or 'auto'")
    _choice("distributed.backend", cfg.distributed.backend, ("auto", "nccl", "gloo"))
    _choice("distributed.checkpoint", cfg.distributed.checkpoint, ("auto", "dcp", "pt"))
    if not (isinstance(t.compile, bool) or t.compile in ("blocks", "auto")):
        raise ConfigError(f"trainer.compile={t.compile}: expected a boolean (true or false), blocks or auto")
    _positive("distributed.replicate", cfg.distributed.replicate)
    _positive("distributed.context_parallel", cfg.distributed.context_parallel)
    if cfg.distributed.context_parallel > 1 and not m._target_.endswith("FromBase"):  # a base brings its own heads
        from tttexp.distributed.context import check_split

        mixers = list(m.mixer_types) if m.mixer_types is not None else [m.mixer]
        try:
            check_split(cfg.distributed.context_parallel, m.num_attention_heads,
                        m.num_key_value_heads or m.num_attention_heads, d.seq_len,
                        m.mini_batch_size if "ttt" in mixers else 1)
        except ValueError as err:  # the same line as at run time, before any process starts
            raise ConfigError(str(err)) from None
    if cfg.distributed._target_.endswith("FullyShardedDataParallel") and isinstance(nproc, int):
        from tttexp.distributed.world import in_existing_world

        if not in_existing_world():
            from tttexp.distributed.fsdp import check_mesh

            try:
                check_mesh(cfg.distributed.replicate, nproc)
            except Exception as err:  # StrategyError: the same line, before any process starts
                raise ConfigError(str(err)) from None
    if cfg.resume not in (None, "auto") and not str(cfg.resume).strip():
        raise ConfigError("resume must be null, auto or a checkpoint path")
    if cfg.resume not in (None, "auto") and not Path(str(cfg.resume)).expanduser().exists():
        raise ConfigError(f"resume={cfg.resume}: no such checkpoint; give an existing step-*.pt file, or resume=auto")
    if d.source == "text_files":
        from tttexp.data.corpus import expand_path

        for spec in d.paths:
            expand_path(str(spec))  # a missing path or a binary file: one line now, not after loading


def _long_context_checks(cfg: DictConfig) -> None:
    """Passkey settings, and whether the long evaluations fit in memory at the configured batch."""
    from tttexp.training.long_context import check_fits

    problem = check_settings(cfg.passkey)
    if problem:
        raise ConfigError(problem)
    m, d, t = cfg.model, cfg.data, cfg.trainer
    if cfg.study.select_by != "val_loss":
        raise ConfigError(f"study.select_by={cfg.study.select_by!r} is not allowed; choose val_loss")
    common = {"hidden": m.hidden_size, "vocab": m.vocab_size or d.vocab_size, "heads": m.num_attention_heads,
              "device": cfg.device}
    checks = []
    cp = cfg.distributed.context_parallel  # > 1: each rank evaluates its slice of every sequence
    mixers = list(m.mixer_types) if m.mixer_types is not None else [m.mixer]
    step = cp * (m.mini_batch_size if "ttt" in mixers else 1)
    if t.position_eval_sequences > 0:
        length = t.position_eval_len or 4 * d.seq_len
        if cp > 1 and length % step:
            raise ConfigError(f"trainer.position_eval_len={length} must be a multiple of {step} under "
                              f"distributed.context_parallel={cp} (each rank evaluates whole mini-batches)")
        checks.append(("trainer.position_eval_len", d.batch_size, length // cp))
    if cfg.passkey.enabled:  # the prompt's longest prefix of whole mini-batches is split, the rest runs whole
        longest = max(cfg.passkey.lengths)
        checks.append(("passkey.lengths", cfg.passkey.trials, longest if cp == 1 else longest // cp + step))
    for what, batch, length in checks:
        problem = check_fits(what=what, batch=batch, length=length, **common)
        if problem:
            raise ConfigError(problem)
