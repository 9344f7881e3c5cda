"""Turn a pretrained Llama-family causal LM into a TTT model, or a TTT/attention hybrid.

The TTT model gets the base's width, depth, heads, SwiGLU size, vocabulary, RMSNorm eps and RoPE theta, with the
``transformer`` backbone (separate Q/K/V projections, no convs, no gate): its block is then Llama's block with the
attention swapped for a sequence mixer. Copied as they are: embeddings, norms, MLPs, final norm and LM head, and
the whole attention of every layer that stays attention. A layer that becomes TTT takes the base's Q and O
projections and its K/V projections with each grouped-query K/V head repeated for the query heads it serves; the
rest of the TTT layer (inner model, learning-rate gate, LayerNorms, output gate and bias) is new.

Starting point: each TTT layer's output is ``gate * out + bias`` with the gate at 0 and the bias at the base
attention's mean output over a few calibration sequences, so the converted model starts as the base with the
converted attention layers replaced by their mean ("mean ablation"), and the TTT path opens as the gate learns.
Measured on SmolLM2-135M, all 30 layers converted: replacing the attention by zero gives a loss above a random
model's; by its mean, about two nats above the base's.

RoPE: the TTT layers keep positions modulo the mini-batch size but use the base's theta, so the pretrained Q/K see
the same relative rotations inside a mini-batch as they did in the base.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from tttexp.models.configuration import TTTConfig
from tttexp.models.modeling import TTTForCausalLM

# Model types whose weights can map exactly; check_convertible checks the details (biases, activation, RoPE).
SUPPORTED_MODEL_TYPES = ("llama", "mistral")
# Parameters of a converted TTT layer that come from the base; every other TTT-layer parameter is new.
_MAPPED_TTT_PARAMS = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")


class ConversionError(ValueError):
    """A base model that cannot be converted; the message is one line."""


def architecture_name(config: PretrainedConfig) -> str:
    archs = getattr(config, "architectures", None) or []
    return f"{archs[0]} ({config.model_type})" if archs else str(config.model_type)


def check_convertible(config: PretrainedConfig) -> None:
    """Raise :class:`ConversionError` unless every weight of the base maps exactly onto the TTT model."""
    name = architecture_name(config)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(
            f"architecture {name} is not supported: only {', '.join(SUPPORTED_MODEL_TYPES)} models map onto the "
            "TTT block (pre-norm RMSNorm, SwiGLU, bias-free rotary attention)"
        )
    width, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or width // heads
    if width % heads or head_dim * heads != width:
        raise ConversionError(
            f"{name}: head dim {head_dim} x {heads} heads != hidden size {width}; the TTT layer needs "
            "num_attention_heads * head_dim == hidden_size"
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ConversionError(f"{name}: projections with biases are not supported (the TTT block has none)")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ConversionError(f"{name}: MLP activation {config.hidden_act!r} is not supported (only silu)")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ConversionError(f"{name}: RoPE scaling {rope.get('rope_type')!r} is not supported (only plain RoPE)")
    if getattr(config, "sliding_window", None) is not None:
        raise ConversionError(f"{name}: sliding-window attention is not supported (only full causal attention)")


def parse_layers(spec: str | Iterable[int], num_layers: int) -> list[int]:
    """The layer indices to convert: ``all``, ``every_other`` (the odd layers: 1, 3, ...; layer 0 keeps its
    attention) or a list of indices (``"0,2,5"`` or a sequence of ints)."""
    if isinstance(spec, str):
        text = spec.strip()
        if text == "all":
            return list(range(num_layers))
        if text == "every_other":
            return list(range(1, num_layers, 2))
        parts = [p for p in text.replace(",", " ").split() if p]
        try:
            layers = [int(p) for p in parts]
        except ValueError:
            raise ConversionError(
                f"convert_layers={spec!r}: use all, every_other or comma-separated layer indices"
            ) from None
    else:
        layers = [int(i) for i in spec]
    bad = [i for i in layers if not 0 <= i < num_layers]
    if not layers or bad or len(set(layers)) != len(layers):
        raise ConversionError(
            f"convert_layers={spec!r}: need distinct layer indices in 0..{num_layers - 1} (the base has "
            f"{num_layers} layers)"
        )
    return sorted(layers)


def ttt_config_for(
    base: PretrainedConfig, layers: Iterable[int], *, eos_token_id: int | None = None, **ttt_options: object
) -> TTTConfig:
    """The config of the converted model: the base's sizes, ``ttt`` at ``layers`` and ``attention`` elsewhere.

    ``ttt_options`` are TTT settings the base does not fix (``ttt_layer``, ``mini_batch_size``, ``ttt_base_lr``,
    ``kernel``, ``initializer_range``; ``ttt_output_gate`` defaults to on).
    """
    check_convertible(base)
    chosen = set(layers)
    rope = getattr(base, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(base, "rope_theta", 10000.0))
    n = base.num_hidden_layers
    ttt_options.setdefault("ttt_output_gate", True)
    return TTTConfig(
        vocab_size=base.vocab_size,
        hidden_size=base.hidden_size,
        intermediate_size=base.intermediate_size,
        num_hidden_layers=n,
        num_attention_heads=base.num_attention_heads,
        num_key_value_heads=getattr(base, "num_key_value_heads", None) or base.num_attention_heads,
        mixer_types=["ttt" if i in chosen else "attention" for i in range(n)],
        backbone="transformer",
        rope_theta=float(theta),
        rms_norm_eps=base.rms_norm_eps,
        tie_word_embeddings=bool(getattr(base, "tie_word_embeddings", False)),
        bos_token_id=getattr(base, "bos_token_id", None),
        eos_token_id=eos_token_id,
        **ttt_options,
    )


def _repeat_heads(weight: torch.Tensor, kv_heads: int, groups: int) -> torch.Tensor:
    """``[kv_heads * F, width]`` -> ``[kv_heads * groups * F, width]``: K/V head j serves query heads
    ``j * groups ... (j + 1) * groups - 1`` (the grouped-query layout)."""
    rows = weight.view(kv_heads, -1, weight.shape[-1])
    return rows.repeat_interleave(groups, dim=0).reshape(-1, weight.shape[-1])


@torch.no_grad()
def mean_attention_outputs(
    base: PreTrainedModel, layers: Iterable[int], calibration: Sequence[torch.Tensor]
) -> dict[int, torch.Tensor]:
    """The mean over all tokens of ``calibration`` (batches of input ids) of each layer's attention output."""
    layers = list(layers)
    sums = {i: torch.zeros(base.config.hidden_size, dtype=torch.float64) for i in layers}
    count = 0

    def hook(index: int):
        def record(module: nn.Module, args: object, output: object) -> None:
            out = output[0] if isinstance(output, tuple) else output
            sums[index] += out.detach().double().sum(dim=(0, 1)).cpu()
        return record

    handles = [base.model.layers[i].self_attn.register_forward_hook(hook(i)) for i in layers]
    device = next(base.parameters()).device
    try:
        for ids in calibration:
            base.model(input_ids=ids.to(device))
            count += ids.numel()
    finally:
        for handle in handles:
            handle.remove()
    return {i: (total / max(count, 1)).float() for i, total in sums.items()}


@torch.no_grad()
def convert_llama(
    base: PreTrainedModel, layers: str | Iterable[int] = "all", *, eos_token_id: int | None = None,
    calibration: Sequence[torch.Tensor] = (), **ttt_options: object,
) -> TTTForCausalLM:
    """A :class:`TTTForCausalLM` initialised from ``base`` (a Llama-family ``*ForCausalLM``); see the module
    docstring for what is copied. ``calibration``: batches of input ids for the output biases (none: biases at
    0, i.e. the converted layers start as removed). Fresh parameters are drawn from torch's global generator."""
    cfg = base.config
    check_convertible(cfg)
    chosen = parse_layers(layers, cfg.num_hidden_layers)
    config = ttt_config_for(cfg, chosen, eos_token_id=eos_token_id, **ttt_options)
    model = TTTForCausalLM(config)
    dtype = next(model.parameters()).dtype
    means = mean_attention_outputs(base, chosen, calibration) if calibration else {}
    src, dst = base.model, model.model

    def copy(target: nn.Module, source: nn.Module) -> None:
        target.weight.copy_(source.weight.to(dtype))

    copy(dst.embed_tokens, src.embed_tokens)
    copy(dst.norm, src.norm)
    if not config.tie_word_embeddings:
        copy(model.lm_head, base.lm_head)
    groups = config.num_attention_heads // config.num_key_value_heads
    for i, (block, layer) in enumerate(zip(dst.layers, src.layers, strict=True)):
        copy(block.seq_norm, layer.input_layernorm)
        copy(block.ffn_norm, layer.post_attention_layernorm)
        for name in ("gate_proj", "up_proj", "down_proj"):
            copy(getattr(block.mlp, name), getattr(layer.mlp, name))
        attn = layer.self_attn
        if block.mixer == "attention":
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                copy(getattr(block.attn, name), getattr(attn, name))
            continue
        ttt = block.ttt
        copy(ttt.q_proj, attn.q_proj)
        copy(ttt.o_proj, attn.o_proj)
        kv = config.num_key_value_heads
        ttt.k_proj.weight.copy_(_repeat_heads(attn.k_proj.weight, kv, groups).to(dtype))
        ttt.v_proj.weight.copy_(_repeat_heads(attn.v_proj.weight, kv, groups).to(dtype))
        if i in means:
            ttt.output_bias.copy_(means[i].to(dtype))
    return model


def new_parameter_names(model: TTTForCausalLM) -> list[str]:
    """Parameters that a conversion leaves freshly initialised: everything of the TTT layers except the four
    projections taken from the base (the output gate included)."""
    names = []
    for i, block in enumerate(model.model.layers):
        if block.mixer != "ttt":
            continue
        for name, _ in block.ttt.named_parameters():
            if name not in _MAPPED_TTT_PARAMS:
                names.append(f"model.layers.{i}.ttt.{name}")
    return names


def freeze_pretrained(model: TTTForCausalLM) -> list[str]:
    """Train only the new parameters (``requires_grad=False`` on the rest); returns the trainable names."""
    trainable = set(new_parameter_names(model))
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    return sorted(trainable)
