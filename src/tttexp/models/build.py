"""Model sources for the app's ``model`` group: fresh weights (:class:`FromScratch`); a converted pretrained base
lives in :mod:`tttexp.models.pretrained` (:class:`~tttexp.models.pretrained.FromBase`).

A source is built from the config cheaply; the app asks it for the tokenizer the data must use (``None``: the
data group's own) and then builds the model once the data knows its vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from tttexp.models.configuration import TTTConfig
from tttexp.models.modeling import TTTForCausalLM


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


class FromScratch:
    """Fresh weights at the configured size; the data group's tokenizer."""

    def __init__(self, **settings: Any) -> None:
        for key in ("base_model", "convert_layers", "freeze", "trust_remote_code", "stream"):
            settings.pop(key, None)
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
