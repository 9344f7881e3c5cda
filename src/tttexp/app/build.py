"""The builders the entry points share (train, eval and its harness, the tests): each instantiates one config group
with ``hydra.utils.instantiate``, the project's one-line errors passed through.

``cfg`` is the job's built config (:func:`tttexp.app.schemas.validate`'s, whose checks ran once) or a composed one
(its sections' checks then run as they are built); both are read by attribute.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate

from tttexp.errors import ConfigError, TTTExpError
from tttexp.loggers import catalogue as C


def build(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, with the project's one-line errors passed through unwrapped (Hydra wraps
    whatever a target raises in a multi-line InstantiationException)."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, TTTExpError):
            raise cause from None
        if isinstance(cause, ValueError):  # the constructors' own argument checks: one line each
            raise ConfigError(" ".join(str(cause).split())) from None
        raise


def build_layout(cfg: Any) -> Any:
    """The process/device layer from ``distributed``, with the numerics the ``trainer`` group owns."""
    t = cfg.trainer
    return build(cfg.distributed, precision=t.precision, compile=t.compile, tf32=t.tf32,
                 deterministic=t.deterministic, on_cpu=t.on_cpu, label=f"strategy={cfg.strategy}")


def build_data(data: Any) -> Any:
    """The DataModule: from a built :class:`~tttexp.data.config.DataConfig` as it is (checked once, when built), or
    from a composed ``data`` node (checked as the module builds its config)."""
    from tttexp.data.config import DataConfig
    from tttexp.data.module import DataModule

    return DataModule(data) if isinstance(data, DataConfig) else build(data)


def build_model_and_data(cfg: Any, layout: Any, data: Any, resuming: bool = False,
                         resume_config: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """The model source (``model._target_``) names the tokenizer, the data is set up with it, then the model is
    built on the process layout's device. Returns the model and the facts the source adds to the run's record."""
    from tttexp.data.tokenizer import wrap_transformers_tokenizer
    from tttexp.models.pretrained import peek_batches
    from tttexp.training.validation import mean_loss

    source = build(cfg.model, stream=cfg.data.stream)
    base_tokenizer = source.tokenizer()
    tokenizer = wrap_transformers_tokenizer(base_tokenizer, source.label) if base_tokenizer is not None else None
    data.setup(rank=layout.data_rank, world_size=layout.data_world_size, mini_batch_size=cfg.model.mini_batch_size,
               tokenizer=tokenizer, device=layout.device, check_batches=cfg.trainer.check_batches)

    def validation(model) -> float:
        total, count = mean_loss(model, data.val_set.batches(data.batch_size), autocast=layout.autocast())
        return total / max(count, 1)

    model, facts = source.build(
        vocab_size=data.vocab_size, eos_token_id=data.tokenizer.eos_id,
        calibration=lambda: peek_batches(data.train_loader, 16), validation=validation,
        resuming=resuming, resume_config=resume_config, device=layout.device,
    )
    if layout.is_main and C.MODEL_BASE_VAL_LOSS in facts:
        print(f"base model {facts[C.MODEL_BASE_MODEL]}: val loss {facts[C.MODEL_BASE_VAL_LOSS]:.4f}; converted "
              f"({facts[C.MODEL_NUM_CONVERTED_LAYERS]} layers TTT): {facts[C.MODEL_CONVERTED_VAL_LOSS]:.4f}",
              flush=True)
    return model, facts


def build_logger(cfg: Any, run_dir: Path, is_main: bool) -> Any:
    from tttexp.loggers import JsonlLogger, LoggerGroup, NullLogger

    if not is_main:
        return NullLogger()
    backend = build(cfg.logging) if cfg.logging._target_.endswith("WandbLogger") else NullLogger()
    return LoggerGroup([JsonlLogger(run_dir / "metrics.jsonl"), backend])
