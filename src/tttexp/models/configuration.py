"""TTTConfig: the HF-style configuration of a TTT language model, with the paper's size presets."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from tttexp.ops.names import KERNELS, TTT_LAYERS

BACKBONES = ("mamba", "transformer")
MIXERS = ("ttt", "attention")

# hidden / layers / heads / SwiGLU intermediate (Sun et al. 2024, Table of model sizes). 760m has head dim 96.
SIZE_PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 352},
    "125m": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 2048},
    "350m": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 2736},
    "760m": {"hidden_size": 1536, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096},
    "1.3b": {"hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 32, "intermediate_size": 5504},
}


def _one_of(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


class TTTConfig(PretrainedConfig):
    """Configuration of :class:`tttexp.models.TTTForCausalLM`.

    ``ttt_layer`` picks the inner model (``linear``: W [f x f]; ``mlp``: two layers, hidden 4f). ``backbone``
    ``mamba`` is the paper's block (shared Q/K projection with separate causal convs, a pre-conv residual block and
    an output gate); ``transformer`` has separate Q/K/V projections and no gate. ``mini_batch_size`` is K, the
    number of tokens per inner gradient step; RoPE positions run modulo K. ``ttt_base_lr`` defaults to 1.0 for
    linear and 0.1 for mlp when left ``None``.

    ``mixer_types`` gives each layer's sequence mixer (``ttt`` or ``attention``: Llama-style causal softmax
    attention with ``num_key_value_heads`` K/V heads and RoPE at absolute positions); ``None`` means all TTT.
    It is not called ``layer_types`` because transformers reserves that name for its own attention vocabulary.
    ``ttt_output_gate`` turns each TTT layer's output into ``gate * out + bias`` with learnable per-channel
    ``gate`` and ``bias`` that start at 0: a layer converted from attention then starts as a constant (the
    conversion sets ``bias`` to the base attention's mean output), and the TTT path opens as training goes.
    ``kernel_settings`` are launch settings of the Triton kernels (``tttexp.ops.settings``; empty: their
    defaults); they change the speed, not the math.
    """

    model_type = "tttexp"

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 768,
        intermediate_size: int = 2048,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        ttt_layer: str = "linear",
        backbone: str = "mamba",
        kernel: str = "auto",
        mini_batch_size: int = 16,
        ttt_base_lr: float | None = None,
        rope_theta: float = 10000.0,
        conv_kernel: int = 4,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        tie_word_embeddings: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        num_key_value_heads: int | None = None,
        mixer_types: list[str] | None = None,
        ttt_output_gate: bool = False,
        kernel_settings: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        _one_of("model.ttt_layer", ttt_layer, TTT_LAYERS)
        _one_of("model.backbone", backbone, BACKBONES)
        _one_of("model.kernel", kernel, KERNELS)
        for name, value in (
            ("model.vocab_size", vocab_size), ("model.hidden_size", hidden_size),
            ("model.intermediate_size", intermediate_size), ("model.num_hidden_layers", num_hidden_layers),
            ("model.num_attention_heads", num_attention_heads), ("model.mini_batch_size", mini_batch_size),
            ("model.conv_kernel", conv_kernel),
        ):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"model.hidden_size ({hidden_size}) must be divisible by model.num_attention_heads "
                f"({num_attention_heads})"
            )
        num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        if not isinstance(num_key_value_heads, int) or num_key_value_heads <= 0 or (
            num_attention_heads % num_key_value_heads
        ):
            raise ValueError(
                f"model.num_key_value_heads must be a positive divisor of model.num_attention_heads "
                f"({num_attention_heads}), got {num_key_value_heads!r}"
            )
        if mixer_types is not None:
            mixer_types = list(mixer_types)
            if len(mixer_types) != num_hidden_layers or any(m not in MIXERS for m in mixer_types):
                raise ValueError(
                    f"model.mixer_types must list {num_hidden_layers} entries from {list(MIXERS)}, got {mixer_types!r}"
                )
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.ttt_layer = ttt_layer
        self.backbone = backbone
        self.kernel = kernel
        self.mini_batch_size = mini_batch_size
        self.ttt_base_lr = ttt_base_lr if ttt_base_lr is not None else (1.0 if ttt_layer == "linear" else 0.1)
        self.rope_theta = rope_theta
        self.conv_kernel = conv_kernel
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.num_key_value_heads = num_key_value_heads
        self.mixer_types = mixer_types
        self.ttt_output_gate = bool(ttt_output_gate)
        self.kernel_settings = dict(kernel_settings or {})
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def mixer(self, layer: int) -> str:
        """The sequence mixer of layer ``layer``: ``ttt`` or ``attention``."""
        return "ttt" if self.mixer_types is None else self.mixer_types[layer]

    @property
    def share_qk(self) -> bool:
        return self.backbone == "mamba"

    @property
    def pre_conv(self) -> bool:
        return self.backbone == "mamba"

    @property
    def use_gate(self) -> bool:
        return self.backbone == "mamba"

    @classmethod
    def from_size(cls, size: str, **overrides: Any) -> TTTConfig:
        """A config from a named size preset (``tiny``, ``125m``, ``350m``, ``760m``, ``1.3b``) plus overrides."""
        if size not in SIZE_PRESETS:
            raise ValueError(f"model size must be one of {list(SIZE_PRESETS)}, got {size!r}")
        return cls(**{**SIZE_PRESETS[size], **overrides})
