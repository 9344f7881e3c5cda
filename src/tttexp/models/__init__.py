"""TTT language models (HF-compatible): config, model, cache; registered with the transformers Auto classes."""

from transformers import AutoConfig, AutoModelForCausalLM

from tttexp.models.build import FromScratch, build_model
from tttexp.models.cache import LayerState, TTTCache
from tttexp.models.configuration import BACKBONES, SIZE_PRESETS, TTT_LAYERS, TTTConfig
from tttexp.models.modeling import TTTCausalLMOutput, TTTForCausalLM, TTTModel

AutoConfig.register(TTTConfig.model_type, TTTConfig, exist_ok=True)
AutoModelForCausalLM.register(TTTConfig, TTTForCausalLM, exist_ok=True)

__all__ = [
    "BACKBONES",
    "SIZE_PRESETS",
    "TTT_LAYERS",
    "LayerState",
    "TTTCache",
    "TTTCausalLMOutput",
    "TTTConfig",
    "TTTForCausalLM",
    "TTTModel",
    "FromScratch",
    "build_model",
]
