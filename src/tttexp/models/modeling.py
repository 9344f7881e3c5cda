"""TTTForCausalLM: a TTT language model that plugs into transformers (save/load, Auto classes, generate)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel

try:  # transformers >= 5: initialisers that skip tensors loaded from a checkpoint
    from transformers import initialization as init
except ImportError:  # pragma: no cover - older transformers
    from torch.nn import init
from transformers.utils import ModelOutput

from tttexp import ops
from tttexp.models.attention import Attention
from tttexp.models.cache import TTTCache
from tttexp.models.configuration import TTTConfig
from tttexp.models.layers import CausalConv, RMSNorm, SwiGLU
from tttexp.models.ttt_layer import TTTLayer

if TYPE_CHECKING:
    from tttexp.distributed.context import ContextParallel


@dataclass
class TTTCausalLMOutput(ModelOutput):
    loss: Tensor | None = None
    logits: Tensor | None = None
    cache: TTTCache | None = None


class TTTBlock(nn.Module):
    """Pre-norm residual block: [pre-conv] -> TTT (or softmax attention, ``mixer="attention"``) -> SwiGLU.

    The pre-conv residual block belongs to the Mamba-backbone *TTT* block only: an attention block is always the
    plain Llama block (RMSNorm, attention, RMSNorm, SwiGLU) whatever the backbone, so ``mixer=attention`` is the
    paper's Transformer++ and a hybrid's attention layers carry no TTT-only pieces.
    """

    def __init__(self, config: TTTConfig, mixer: str = "ttt") -> None:
        super().__init__()
        self.mixer = mixer
        eps = config.rms_norm_eps
        self.pre_conv = config.pre_conv and mixer == "ttt"
        if self.pre_conv:
            self.conv_norm = RMSNorm(config.hidden_size, eps)
            self.conv = CausalConv(config.hidden_size, config.conv_kernel)
        self.seq_norm = RMSNorm(config.hidden_size, eps)
        if mixer == "ttt":
            self.ttt = TTTLayer(config)
        else:
            self.attn = Attention(config)
        self.ffn_norm = RMSNorm(config.hidden_size, eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)
        self.context: ContextParallel | None = None  # the context-parallel group (distributed.context), if any

    def forward(self, x: Tensor, cache, offset: int, starts: Tensor | None, reset: Tensor | None) -> Tensor:
        if self.pre_conv:
            normed = self.conv_norm(x)
            past = cache.convs.get("pre") if cache else None
            cp = self.context if self.context is not None and self.context.active(self.training) else None
            if cp is not None:  # the previous rank's last inputs: a whole-sequence conv; the cache keeps its tail
                past, whole_tail = cp.halo(normed, self.conv.width - 1, past)
            h, tail = self.conv(normed, past, starts)
            if cp is not None:
                tail = whole_tail
            if cache is not None:
                cache.convs["pre"] = tail
            x = x + h
        mix = self.ttt if self.mixer == "ttt" else self.attn
        x = x + mix(self.seq_norm(x), cache, offset, starts, reset)
        return x + self.mlp(self.ffn_norm(x))


class TTTPreTrainedModel(PreTrainedModel):
    config_class = TTTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TTTBlock"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, 0.02) for projections, embeddings and the inner weights; the ``init`` helpers leave tensors
        that were loaded from a checkpoint untouched."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, 0.0, std)
        elif isinstance(module, nn.LayerNorm | RMSNorm):
            init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, TTTLayer):
            for p in module.init_state()[0::2]:
                init.normal_(p, 0.0, std)
            for p in module.init_state()[1::2]:
                init.zeros_(p)
            init.normal_(module.lr_weight, 0.0, std)
            init.zeros_(module.lr_bias)
            init.zeros_(module.learnable_token_idx)
            init.ones_(module.ttt_norm_weight)
            init.zeros_(module.ttt_norm_bias)
            init.copy_(module.token_idx, 1.0 / torch.arange(1, module.k + 1, dtype=torch.float32))
            cos, sin = module.rope_tables(torch.float32)
            init.copy_(module.rope_cos, cos)
            init.copy_(module.rope_sin, sin)
            init.ones_(module.inner_lr_scale)
            if module.output_gate is not None:
                init.zeros_(module.output_gate)
                init.zeros_(module.output_bias)


class TTTModel(TTTPreTrainedModel):
    def __init__(self, config: TTTConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([TTTBlock(config, config.mixer(i)) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.context: ContextParallel | None = None  # set by distributed.context.enable: input_ids is a slice
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self, input_ids: Tensor, cache_params: TTTCache | None = None, doc_starts: Tensor | None = None
    ) -> Tensor:
        bsz, seq = input_ids.shape
        k = self.config.mini_batch_size
        offset = cache_params.seqlen_offset if cache_params is not None else 0
        split = self.context is not None and self.context.active(self.training)  # input_ids: this rank's slice
        if split:
            self.context.check_slice(seq, offset, self.config, [b.mixer for b in self.layers])
        starts = None
        if doc_starts is not None:
            if offset % k or (cache_params is not None and seq % k):
                raise ValueError("doc_starts needs chunks that start and end on mini-batch boundaries")
            starts = torch.zeros(bsz, seq, dtype=torch.bool, device=input_ids.device)
            starts[:, ::k] = doc_starts[:, : (seq + k - 1) // k]
        x = self.embed_tokens(input_ids)
        for i, block in enumerate(self.layers):
            layer_cache = cache_params.layers[i] if cache_params is not None else None
            if self.gradient_checkpointing and self.training and layer_cache is None:
                x = self._gradient_checkpointing_func(block.__call__, x, None, offset, starts, doc_starts)
            else:
                x = block(x, layer_cache, offset, starts, doc_starts)
        if cache_params is not None:
            cache_params.seqlen_offset += seq * (self.context.size if split else 1)  # the whole sequence's tokens
        return self.norm(x)


class TTTForCausalLM(TTTPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: TTTConfig) -> None:
        super().__init__(config)
        self.model = TTTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def blocks(self) -> nn.ModuleList:
        """The residual blocks, in order: the unit of per-block compile and of FSDP sharding."""
        return self.model.layers

    def ttt_layers(self) -> list[TTTLayer]:
        """The TTT layers (a hybrid model's attention layers are left out)."""
        return [block.ttt for block in self.model.layers if block.mixer == "ttt"]

    def set_inner_lr_scale(self, step: int, warmup_steps: int) -> None:
        """The model's own schedule: TTT-MLP's inner learning rate ramps from 0.1x to 1x of ``ttt_base_lr`` over
        the outer warmup (the paper's recipe); TTT-Linear's stays at 1x. The scale lives in a device buffer and
        is written in place (no host sync), so a compiled model reads it as data and never recompiles for it."""
        if self.config.ttt_layer != "mlp":
            return
        ramp = 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)
        for layer in self.ttt_layers():
            layer.inner_lr_scale.fill_(0.1 + 0.9 * ramp)

    def resolved_kernel(self, device_type: str) -> str:
        """The inner-loop implementation that runs on ``device_type``: ``model.kernel`` with ``auto`` resolved
        (``none`` when the model has no TTT layer)."""
        if not self.ttt_layers():
            return "none"
        return ops.resolve_kernel(self.config.kernel, device_type)

    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        cache: TTTCache | None = None,
        use_cache: bool | None = None,
        doc_starts: Tensor | None = None,
        cache_params: TTTCache | None = None,
        **kwargs,
    ) -> TTTCausalLMOutput:
        """``labels`` are already aligned with ``input_ids`` (position t predicts ``labels[:, t]``; -100 = no loss).

        ``cache`` (alias ``cache_params``, the older Mamba name) continues a sequence and is updated in place;
        ``use_cache`` creates one. ``doc_starts [B, ceil(T/K)]`` resets a row's TTT state and conv history at
        mini-batch n where a new document begins.
        """
        cache_params = cache if cache is not None else cache_params
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if use_cache and cache_params is None:
            cache_params = TTTCache(self.config.num_hidden_layers)
        hidden = self.model(input_ids, cache_params=cache_params, doc_starts=doc_starts)
        logits = self.lm_head(hidden)
        loss = None
        context = self.model.context
        if labels is not None and context is not None and context.active(self.training):
            loss = context.token_mean_loss(logits, labels)
        elif labels is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        return TTTCausalLMOutput(loss=loss, logits=logits, cache=cache_params)

    # --- generation: the cache is ours, transformers only carries it between steps ---------------------------

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    def prepare_inputs_for_generation(
        self, input_ids: Tensor, cache: TTTCache | None = None, use_cache: bool | None = None, **kwargs
    ) -> dict:
        cache = cache if cache is not None else kwargs.get("cache_params")
        if cache is not None and cache.seqlen_offset > 0:
            input_ids = input_ids[:, cache.seqlen_offset :]
        return {"input_ids": input_ids, "cache": cache, "use_cache": use_cache}

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs: dict, *args, **kwargs) -> dict:
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        model_kwargs.pop("cache_params", None)
        model_kwargs["cache"] = outputs.get("cache")
        return model_kwargs

    def _reorder_cache(self, cache_params: TTTCache, beam_idx: Tensor) -> TTTCache:
        cache_params.reorder(beam_idx)
        return cache_params
