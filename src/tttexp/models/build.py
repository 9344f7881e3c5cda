"""Model sources for the app's ``model`` group: fresh weights (:class:`FromScratch`); a converted pretrained base
lives in :mod:`tttexp.models.pretrained` (:class:`~tttexp.models.pretrained.FromBase`).

A source is built from the config cheaply; the app asks it for the tokenizer the data must use (``None``: the
data group's own) and then builds the model once the data knows its vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from tttexp.configs import RESUME, choice, positive
from tttexp.errors import ConfigError
from tttexp.models.configuration import BACKBONES, KERNELS, MIXERS, TTT_LAYERS, TTTConfig
from tttexp.models.modeling import TTTForCausalLM
from tttexp.ops.settings import kernel_settings

FROM_SCRATCH = "tttexp.models.FromScratch"


@dataclass
class FromScratchConfig:
    """The ``model`` group under every recipe but ``from_pretrained`` (``conf/model/*.yaml``: the paper's sizes plus
    ``tiny``): fresh weights at these sizes. The TTT options (``ttt_layer``, ``kernel``, ``kernel_settings``,
    ``mini_batch_size``, ``ttt_base_lr``, ``conv_kernel``) are ignored by attention layers. Fields marked
    ``RESUME`` must match on resume.
    """

    _target_: str = field(default=FROM_SCRATCH, metadata=RESUME)  # the model source
    name: str = "tiny"  # the size preset's name, for logs and run names
    hidden_size: int = field(default=128, metadata=RESUME)
    num_hidden_layers: int = field(default=4, metadata=RESUME)
    num_attention_heads: int = field(default=4, metadata=RESUME)
    intermediate_size: int = field(default=352, metadata=RESUME)  # SwiGLU width
    # every layer's sequence mixer: ttt | attention (the Transformer++ baseline)
    mixer: str = field(default="ttt", metadata=RESUME)
    # per-layer mixers for hybrids, e.g. [ttt,attention,ttt,attention]
    mixer_types: list[str] | None = field(default=None, metadata=RESUME)
    # attention layers' K/V heads (GQA); None: num_attention_heads
    num_key_value_heads: int | None = field(default=None, metadata=RESUME)
    ttt_layer: str = field(default="linear", metadata=RESUME)  # linear | mlp
    # mamba (the paper's block: shared Q/K, convs, output gate) | transformer
    backbone: str = field(default="mamba", metadata=RESUME)
    kernel: str = "auto"  # auto (Triton on CUDA, else torch) | triton | torch; the model resolves auto
    # launch settings of the Triton kernels by name (tttexp.ops.settings), e.g. 'model.kernel_settings={split_bwd:true}'
    # or +model.kernel_settings.split_bwd=true; None: their defaults. They change the speed, not the math.
    kernel_settings: Any = None
    mini_batch_size: int = field(default=16, metadata=RESUME)  # K: tokens per inner gradient step
    ttt_base_lr: float | None = field(default=None, metadata=RESUME)  # None: 1.0 for linear, 0.1 for mlp
    rope_theta: float = field(default=10000.0, metadata=RESUME)
    conv_kernel: int = field(default=4, metadata=RESUME)
    initializer_range: float = 0.02
    vocab_size: int | None = field(default=None, metadata=RESUME)  # None: taken from the tokenizer
    gradient_checkpointing: bool = False  # recompute each block in the backward to save memory

    def __post_init__(self) -> None:
        """The checks of the model settings alone (those against data.seq_len are the app's)."""
        self._check_source()
        choice("model.ttt_layer", self.ttt_layer, TTT_LAYERS)
        choice("model.backbone", self.backbone, BACKBONES)
        choice("model.kernel", self.kernel, KERNELS)
        check_kernel_settings(self.ttt_layer, self.kernel_settings)
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                    "mini_batch_size", "conv_kernel"):
            positive(f"model.{key}", getattr(self, key))
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"model.hidden_size={self.hidden_size} must be divisible by "
                              f"model.num_attention_heads={self.num_attention_heads}")
        choice("model.mixer", self.mixer, MIXERS)
        for i, kind in enumerate(self.mixer_types or []):
            choice(f"model.mixer_types[{i}]", kind, MIXERS)
        self._check_shapes()

    def _check_source(self) -> None:
        if self._target_ != FROM_SCRATCH:
            raise ConfigError(f"model._target_={self._target_}: the model source comes with the recipe; use "
                              "strategy=from_pretrained for a pretrained base")

    def _check_shapes(self) -> None:
        """What the layers cannot take at these sizes (a converted base brings its own)."""
        if self.mixer_types is not None and len(self.mixer_types) != self.num_hidden_layers:
            raise ConfigError(f"model.mixer_types lists {len(self.mixer_types)} layers but model.num_hidden_layers="
                              f"{self.num_hidden_layers}; give one mixer per layer")
        head_dim = self.hidden_size // self.num_attention_heads
        if head_dim % 2:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} / model.num_attention_heads={self.num_attention_heads} gives "
                f"a head dim of {head_dim}; RoPE rotates pairs of features, so the head dim must be even"
            )

    @property
    def mixers(self) -> list[str]:
        """Each layer's mixer as configured (``mixer_types``, or ``mixer`` for every layer)."""
        return list(self.mixer_types) if self.mixer_types is not None else [self.mixer]


def build_model(
    *,
    vocab_size: int,
    name: str = "custom",
    mixer: str = "ttt",
    gradient_checkpointing: bool = False,
    eos_token_id: int | None = None,
    **config: Any,
) -> TTTForCausalLM:
    """A freshly initialised :class:`TTTForCausalLM`; ``config`` holds :class:`TTTConfig` fields.

    ``mixer="attention"`` makes every layer causal softmax attention (the Transformer++ baseline) unless
    ``mixer_types`` lists the layers one by one.
    """
    if config.get("mixer_types") is None and mixer != "ttt":
        config["mixer_types"] = [mixer] * int(config.get("num_hidden_layers", 12))
    cfg = TTTConfig(vocab_size=vocab_size, eos_token_id=eos_token_id, **config)
    cfg.preset_name = name
    model = TTTForCausalLM(cfg)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def check_kernel_settings(ttt_layer: str, settings: Any) -> None:
    """``model.kernel_settings`` against the fields of ``ttt_layer``'s launch settings: one line naming the setting
    to change."""
    if settings is not None and not isinstance(settings, Mapping):
        raise ConfigError(f"model.kernel_settings={settings!r}: expected settings by name, e.g. "
                          "'model.kernel_settings={split_bwd:true}'")
    try:
        kernel_settings(ttt_layer, settings)
    except ValueError as err:
        raise ConfigError(str(err)) from None


class FromScratch:
    """Fresh weights at the configured size; the data group's tokenizer."""

    def __init__(self, *, stream: bool = False, **settings: Any) -> None:
        """``settings``: the fields of :class:`FromScratchConfig`; ``stream`` (state passing) needs nothing here."""
        if settings.get("vocab_size") is None:
            settings.pop("vocab_size", None)
        self.settings = settings

    def tokenizer(self) -> Any | None:
        return None

    def build(
        self,
        *,
        vocab_size: int,
        eos_token_id: int | None,
        calibration: Callable[[], Iterable[Any]] | None = None,
        validation: Callable[[nn.Module], float] | None = None,
        resuming: bool = False,
        resume_config: dict[str, Any] | None = None,
        device: Any = "cpu",
    ) -> tuple[TTTForCausalLM, dict[str, Any]]:
        """The model (on ``device``) and the facts it adds to the run's record (none here). ``resume_config`` is
        not needed: the settings rebuild the same model, and the fingerprint check guarantees they match."""
        settings = dict(self.settings)
        vocab = settings.pop("vocab_size", None) or vocab_size
        return build_model(vocab_size=vocab, eos_token_id=eos_token_id, **settings).to(device), {}
