"""Build a model from the app's ``model`` config group (Hydra ``_target_: tttexp.models.build_model``)."""

from __future__ import annotations

from tttexp.models.configuration import TTTConfig
from tttexp.models.modeling import TTTForCausalLM


def build_model(
    *,
    vocab_size: int,
    name: str = "custom",
    gradient_checkpointing: bool = False,
    eos_token_id: int | None = None,
    **config: object,
) -> TTTForCausalLM:
    """A freshly initialised :class:`TTTForCausalLM`; ``config`` holds :class:`TTTConfig` fields."""
    cfg = TTTConfig(vocab_size=vocab_size, eos_token_id=eos_token_id, **config)
    cfg.preset_name = name
    model = TTTForCausalLM(cfg)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model
