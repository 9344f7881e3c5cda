"""Causal softmax self-attention, Llama style, for the layers of a hybrid model that are not TTT.

Grouped-query K/V heads, rotate-half RoPE at absolute positions with ``config.rope_theta``, scaled dot-product
attention with scale ``head_dim ** -0.5``. With the weights of a Llama layer it computes that layer's attention
exactly; with a cache it keeps the keys (after RoPE) and values of the tokens seen so far.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tttexp.models.cache import LayerState
from tttexp.models.configuration import TTTConfig
from tttexp.models.layers import apply_rotary, rotary_tables_op

if TYPE_CHECKING:
    from tttexp.distributed.context import ContextParallel


class Attention(nn.Module):
    def __init__(self, config: TTTConfig) -> None:
        super().__init__()
        self.config = config
        self.heads, self.kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim,
        )
        width = config.hidden_size
        self.q_proj = nn.Linear(width, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(width, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(width, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, width, bias=False)
        self.context: ContextParallel | None = None  # the context-parallel group (distributed.context), if any

    def forward(
        self, hidden: Tensor, cache: LayerState | None, offset: int, starts: Tensor | None, reset: Tensor | None
    ) -> Tensor:
        """Same signature as :class:`TTTLayer`: ``hidden [B, T, width]`` after the pre-norm, ``offset`` tokens
        already consumed, ``starts [B, T]`` marking document starts (a token never attends across one);
        ``reset`` is the TTT layers' form of ``starts`` and is not needed here."""
        bsz, seq, _ = hidden.shape
        q = self.q_proj(hidden).view(bsz, seq, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden).view(bsz, seq, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden).view(bsz, seq, -1, self.head_dim).transpose(1, 2)
        # this rank's slice (training, or a split evaluation); otherwise whole sequences
        cp = self.context if self.context is not None and self.context.active(self.training) else None
        first = offset if cp is None else offset + cp.position_offset(seq)
        positions = torch.arange(seq, device=hidden.device) + first
        cos, sin = rotary_tables_op(positions, self.head_dim, self.config.rope_theta, q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        local = seq
        if cp is not None:  # Ulysses: from here on all tokens of this rank's heads (its K/V heads in the cache)
            q, k, v = self._to_heads(cp, q, k, v)
            seq, starts = q.shape[2], cp.gather_seq(starts)

        past = 0
        if cache is not None:
            if cache.keys is not None:
                past = cache.keys.shape[2]
                k = torch.cat([cache.keys.to(k.dtype), k], dim=2)
                v = torch.cat([cache.values.to(v.dtype), v], dim=2)
            cache.keys, cache.values = k, v
        mask = self._mask(bsz, seq, past, starts, cache, hidden.device)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and seq > 1, scale=self.head_dim**-0.5,
            enable_gqa=self.kv_heads != self.heads,
        )
        if cp is not None:  # all-to-all back: this rank's tokens, all heads
            return self.o_proj(cp.heads_to_seq(out.transpose(1, 2)).reshape(bsz, local, -1))
        return self.o_proj(out.transpose(1, 2).reshape(bsz, seq, -1))

    def _to_heads(self, cp: ContextParallel, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``q [B, H, T/cp, D]``, ``k, v [B, H_kv, T/cp, D]`` (this rank's tokens) -> the same for all ``T`` tokens
        of this rank's ``H / cp`` heads and ``H_kv / cp`` K/V heads (K and V in one exchange)."""
        d = self.head_dim
        q = cp.seq_to_heads(q.transpose(1, 2)).transpose(1, 2)
        kv = cp.seq_to_heads(torch.cat([k, v], dim=-1).transpose(1, 2)).transpose(1, 2)
        return q, kv[..., :d], kv[..., d:]

    @staticmethod
    def _mask(
        bsz: int, seq: int, past: int, starts: Tensor | None, cache: LayerState | None, device: torch.device
    ) -> Tensor | None:
        """``None`` where plain causal attention is right (SDPA's own causal path, as transformers' Llama uses),
        else a boolean ``[B or 1, 1, T, past + T]`` mask: causal, and no key before the reader's document start."""
        doc_start = cache.doc_start if cache is not None else None
        if starts is None and doc_start is None and (past == 0 or seq == 1):
            return None
        q_idx = torch.arange(seq, device=device) + past
        key_idx = torch.arange(past + seq, device=device)
        causal = key_idx[None, :] <= q_idx[:, None]
        if starts is None and doc_start is None:
            return causal[None, None]
        first = torch.zeros(bsz, seq, dtype=torch.long, device=device)
        if starts is not None:
            first = torch.where(starts, q_idx, torch.zeros_like(q_idx)).cummax(dim=1).values
        if doc_start is not None:
            first = torch.maximum(first, doc_start[:, None])
        if cache is not None:
            cache.doc_start = first[:, -1]
        return (causal[None] & (key_idx[None, None, :] >= first[:, :, None]))[:, None]
