"""The TTT sequence-modelling layer: projections, convs, RoPE, the inner loop, post-norm, gate and output."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tttexp import ops
from tttexp.models.cache import LayerState
from tttexp.models.configuration import TTTConfig
from tttexp.models.layers import CausalConv, apply_rotary, rotary_tables
from tttexp.ops import reference
from tttexp.ops.reference import State

if TYPE_CHECKING:
    from tttexp.distributed.context import ContextParallel


class TTTLayer(nn.Module):
    """TTT-Linear or TTT-MLP over ``[B, T, width]`` hidden states, with optional carried state."""

    def __init__(self, config: TTTConfig) -> None:
        super().__init__()
        self.config = config
        self.layer = config.ttt_layer
        width, heads, f = config.hidden_size, config.num_attention_heads, config.head_dim
        self.width, self.heads, self.head_dim = width, heads, f
        self.k = config.mini_batch_size
        self.kernel_settings = ops.kernel_settings(self.layer, config.kernel_settings)  # None: the kernels' defaults
        self.q_proj = nn.Linear(width, width, bias=False)
        if config.share_qk:
            self.conv_q = CausalConv(width, config.conv_kernel)
            self.conv_k = CausalConv(width, config.conv_kernel)
        else:
            self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.o_proj = nn.Linear(width, width, bias=False)
        if config.use_gate:
            self.g_proj = nn.Linear(width, width, bias=False)
        self.post_norm = nn.LayerNorm(width, eps=1e-6)
        # Gated residual: out = gate * o_proj(...) + bias, per channel, the gate starting closed. A layer converted
        # from attention starts as a constant (the base attention's mean output, set by the conversion).
        self.output_gate = nn.Parameter(torch.zeros(width)) if config.ttt_output_gate else None
        self.output_bias = nn.Parameter(torch.zeros(width)) if config.ttt_output_gate else None

        std = config.initializer_range
        self.lr_weight = nn.Parameter(torch.randn(heads, width) * std)
        self.lr_bias = nn.Parameter(torch.zeros(heads))
        self.register_buffer("token_idx", 1.0 / torch.arange(1, self.k + 1, dtype=torch.float32), persistent=False)
        # RoPE runs at the position inside the mini-batch: one [K, F] table of cos and sin, made once. Built inside
        # the step, torch.compile fuses the table into the kernel that applies it and takes sin and cos per element.
        cos, sin = self.rope_tables(torch.float32)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.learnable_token_idx = nn.Parameter(torch.zeros(self.k))
        self.ttt_norm_weight = nn.Parameter(torch.ones(heads, f))
        self.ttt_norm_bias = nn.Parameter(torch.zeros(heads, f))
        if self.layer == "linear":
            self.W1 = nn.Parameter(torch.randn(heads, f, f) * std)
            self.b1 = nn.Parameter(torch.zeros(heads, f))
        else:
            self.W1 = nn.Parameter(torch.randn(heads, f, 4 * f) * std)
            self.b1 = nn.Parameter(torch.zeros(heads, 4 * f))
            self.W2 = nn.Parameter(torch.randn(heads, 4 * f, f) * std)
            self.b2 = nn.Parameter(torch.zeros(heads, f))
        # Multiplies ttt_base_lr; the trainer ramps it for TTT-MLP (0.1x -> 1x over warmup, as in the paper). A
        # buffer, not a Python float: torch.compile would guard on a float's value and recompile at every change.
        self.register_buffer("inner_lr_scale", torch.ones(()), persistent=False)
        self.context: ContextParallel | None = None  # the context-parallel group (distributed.context), if any

    def init_state(self) -> State:
        if self.layer == "linear":
            return (self.W1, self.b1)
        return (self.W1, self.b1, self.W2, self.b2)

    def _project(self, hidden: Tensor) -> dict[str, Tensor]:
        """Every projection of the layer's input as one GEMM: q, k (without shared Q/K), v, the output gate's g and
        the per-head learning-rate logits (``[B, T, heads]``). One read of ``hidden`` and one wide GEMM instead of
        up to five, the learning-rate one only ``heads`` wide (the parameters stay separate)."""
        parts = {"q": self.q_proj.weight, "v": self.v_proj.weight}
        if not self.config.share_qk:
            parts["k"] = self.k_proj.weight
        if self.config.use_gate:
            parts["g"] = self.g_proj.weight
        parts["lr"] = self.lr_weight
        fused = F.linear(hidden, torch.cat(list(parts.values())))
        return dict(zip(parts, fused.split([w.shape[0] for w in parts.values()], dim=-1), strict=True))

    def _rope(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and sin ``[K, F]`` in ``dtype``: the float32 tables made at construction, or, for float64 (whose
        digits a float32 table would lose) or after the module itself was cast, made again here."""
        if dtype != torch.float64 and self.rope_cos.dtype == torch.float32:
            return self.rope_cos.to(dtype), self.rope_sin.to(dtype)
        return self.rope_tables(dtype, self.rope_cos.device)

    def rope_tables(self, dtype: torch.dtype, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
        """cos and sin ``[K, F]`` of RoPE at the positions ``0..K-1`` of a mini-batch, computed."""
        return rotary_tables(torch.arange(self.k, device=device), self.head_dim, self.config.rope_theta, dtype)

    def _heads(self, x: Tensor) -> Tensor:
        bsz, seq, _ = x.shape
        return x.view(bsz, seq, self.heads, self.head_dim).transpose(1, 2)

    def forward(
        self, hidden: Tensor, cache: LayerState | None, offset: int, starts: Tensor | None, reset: Tensor | None
    ) -> Tensor:
        """``hidden [B, T, width]`` after the pre-norm; ``offset`` = tokens already consumed (for RoPE and the
        position inside the current mini-batch); ``starts [B, T]`` / ``reset [B, N]`` mark document starts."""
        bsz, seq, _ = hidden.shape
        # this rank's slice (training, or a split evaluation); otherwise whole sequences
        cp = self.context if self.context is not None and self.context.active(self.training) else None
        proj = self._project(hidden)
        xq = proj["q"]
        convs = cache.convs if cache is not None else {}
        if self.config.share_qk:
            past_q, past_k = convs.get("q"), convs.get("k")
            if cp is not None:  # the previous rank's last inputs: the convs see the whole sequence
                past_q, whole_tail = cp.halo(xq, self.config.conv_kernel - 1, past_q)
                past_k = past_q  # both convs read xq: their carried tails are the same
            XQ, tail_q = self.conv_q(xq, past_q, starts)
            XK, tail_k = self.conv_k(xq, past_k, starts)
            if cp is not None:
                tail_q = tail_k = whole_tail
            if cache is not None:
                cache.convs["q"], cache.convs["k"] = tail_q, tail_k
        else:
            XQ, XK = xq, proj["k"]
        XQ, XK, XV = self._heads(XQ), self._heads(XK), self._heads(proj["v"])
        first = offset if cp is None else offset + cp.position_offset(seq)
        positions = (torch.arange(seq, device=hidden.device) + first) % self.k
        cos, sin = self._rope(XQ.dtype)
        cos, sin = cos[positions], sin[positions]
        XQ, XK = apply_rotary(XQ, cos, sin), apply_rotary(XK, cos, sin)

        gate_logits = proj["lr"].transpose(1, 2) + self.lr_bias[:, None]
        dtype = reference.compute_dtype(gate_logits)
        scale = self.inner_lr_scale.to(dtype) * (self.config.ttt_base_lr / self.head_dim)
        lr = torch.sigmoid(gate_logits.to(dtype)) * scale
        tok = torch.clamp_min(self.token_idx + self.learnable_token_idx, 0.0)

        if cp is None:
            out = self._inner(XQ, XK, XV, lr, tok, cache, offset, reset)
        else:
            out = self._inner_context(cp, XQ, XK, XV, lr, tok, reset, cache)
        out = out.transpose(1, 2).reshape(bsz, seq, self.width)
        out = self.post_norm(out)
        if self.config.use_gate:
            out = F.gelu(proj["g"], approximate="tanh") * out
        out = self.o_proj(out)
        if self.output_gate is not None:
            out = out * self.output_gate.to(out.dtype) + self.output_bias.to(out.dtype)
        return out

    def _inner(
        self, XQ: Tensor, XK: Tensor, XV: Tensor, lr: Tensor, tok: Tensor,
        cache: LayerState | None, offset: int, reset: Tensor | None,
    ) -> Tensor:
        args = (self.ttt_norm_weight, self.ttt_norm_bias)
        init = self.init_state()
        kernel = self.config.kernel
        if cache is None:
            out, _ = ops.ttt(self.layer, XQ, XK, XV, lr, tok, *args, init, reset=reset, kernel=kernel,
                             settings=self.kernel_settings)
            return out

        # With a cache: finish the pending mini-batch, run whole mini-batches, keep a short tail pending.
        seq = XQ.shape[2]
        pos = offset % self.k
        state = cache.ttt
        outs = []
        start = 0
        if pos:
            head = min(self.k - pos, seq)
            out, cache.pending = self._partial(XQ, XK, XV, lr, tok, 0, head, pos, state, cache.pending)
            outs.append(out)
            start = head
            if pos + head == self.k:
                state = reference.apply_accumulators(state, cache.pending, tok[self.k - 1])
                cache.pending = None
        body = (seq - start) // self.k * self.k
        if body:
            sl = slice(start, start + body)
            out, state = ops.ttt(
                self.layer, XQ[:, :, sl], XK[:, :, sl], XV[:, :, sl], lr[:, :, sl], tok, *args, init,
                state=state, reset=reset, kernel=kernel, settings=self.kernel_settings,
            )
            outs.append(out)
            start += body
        if start < seq:
            if state is None:
                state = reference.expand_state(init, XQ.shape[0], reference.compute_dtype(XQ))
            out, cache.pending = self._partial(XQ, XK, XV, lr, tok, start, seq, 0, state, None)
            outs.append(out)
        cache.ttt = state
        return torch.cat(outs, dim=2)

    def _inner_context(
        self, cp: ContextParallel, XQ: Tensor, XK: Tensor, XV: Tensor, lr: Tensor, tok: Tensor,
        reset: Tensor | None, cache: LayerState | None,
    ) -> Tensor:
        """The inner loop with the sequence split over ``cp``: all-to-all to all tokens of this rank's heads, the
        unchanged op on them, all-to-all back. ``[B, H, T/cp, F]`` in and out. With a cache the inner state of this
        rank's heads continues from ``cache.ttt`` and its final state goes back there: it stays on this rank."""
        f = self.head_dim
        parts = [XQ, XK, XV]
        if lr.dtype == XQ.dtype:  # one exchange for all four (lr is fp32 beside bf16 q/k/v under autocast)
            parts.append(lr[..., None])
        full = cp.seq_to_heads(torch.cat(parts, dim=-1).transpose(1, 2)).transpose(1, 2)
        xq, xk, xv = full[..., :f], full[..., f : 2 * f], full[..., 2 * f : 3 * f]
        if lr.dtype == XQ.dtype:
            lr = full[..., 3 * f]
        else:
            lr = cp.seq_to_heads(lr[..., None].transpose(1, 2)).transpose(1, 2)[..., 0]
        hs = cp.head_slice(self.heads)
        init = tuple(s[hs] for s in self.init_state())
        state = cache.ttt if cache is not None else None
        out, state = ops.ttt(self.layer, xq, xk, xv, lr, tok, self.ttt_norm_weight[hs], self.ttt_norm_bias[hs],
                             init, state=state, reset=cp.gather_seq(reset), kernel=self.config.kernel,
                             settings=self.kernel_settings)
        if cache is not None:
            cache.ttt = state
        return cp.heads_to_seq(out.transpose(1, 2)).transpose(1, 2)

    def _partial(
        self, XQ: Tensor, XK: Tensor, XV: Tensor, lr: Tensor, tok: Tensor,
        start: int, end: int, pos: int, state: State, pending: State | None,
    ) -> tuple[Tensor, State]:
        """Tokens ``start:end`` that sit at positions ``pos..`` of one mini-batch (reference path)."""
        sl = slice(start, end)
        return ops.decode_step(
            self.layer, XQ[:, :, sl], XK[:, :, sl], XV[:, :, sl], lr[:, :, sl], tok[pos : pos + end - start],
            self.ttt_norm_weight, self.ttt_norm_bias, state, pending, kernel=self.config.kernel,
        )
