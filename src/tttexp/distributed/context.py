"""Context parallelism: one sequence split across the ``cp`` ranks of a process group, exact against one process.

Outside the sequence mixers every token is independent, so each rank holds a contiguous slice of ``T / cp`` tokens
of every sequence. Around each TTT or attention layer an all-to-all turns the sequence-split, all-heads tensors into
head-split, full-sequence ones: the TTT inner loop (sequential in time, independent across heads) and softmax
attention then run unchanged on the whole sequence for ``H / cp`` heads, and a second all-to-all brings the output
back (Ulysses-style). The causal convs (per channel, ``w`` taps) read the last ``w - 1`` inputs of the previous
rank's slice: a halo, passed as the conv's carried tail.

The collectives are torch's functional ones (``all_to_all_single``, ``all_gather_single_autograd``): differentiable,
so the backward runs the reverse exchange. Per layer and per direction each rank sends and receives
``(cp - 1) / cp`` of its ``B * T/cp * H * c`` values, ``c`` the channels per head exchanged.

Training always runs the split (the model is in training mode). Evaluation runs whole sequences unless it asks for
the split inside :meth:`ContextParallel.split_evaluation`. With a cache (state passing, a split prefill) each rank
keeps the state of the heads it computes: the TTT inner states and attention keys/values of its ``H / cp`` heads;
the conv tails and ``seqlen_offset`` are the whole sequence's, the same on every rank of the group.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import Tensor, nn

from tttexp.errors import LayoutError


class ContextParallel:
    """The context-parallel group of this process: its rank in the group and the group's size."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self._evaluating = False

    def active(self, training: bool) -> bool:
        """Does a module in this mode take a slice (training, or evaluation inside :meth:`split_evaluation`)?"""
        return training or self._evaluating

    @contextlib.contextmanager
    def split_evaluation(self) -> Iterator[None]:
        """Evaluation calls inside take this rank's slice of each sequence, as training does."""
        before, self._evaluating = self._evaluating, True
        try:
            yield
        finally:
            self._evaluating = before

    # --- the exchange ----------------------------------------------------------------------------------------------

    def seq_to_heads(self, x: Tensor) -> Tensor:
        """``[B, T/cp, H, c]`` (this rank's tokens, all heads) -> ``[B, T, H/cp, c]`` (all tokens, its heads)."""
        bsz, seq, heads, ch = x.shape
        cp = self.size
        send = x.reshape(bsz, seq, cp, heads // cp, ch).permute(2, 0, 1, 3, 4).contiguous()
        got = _wait(funcol.all_to_all_single(send.flatten(0, 1), None, None, self.group))
        got = got.view(cp, bsz, seq, heads // cp, ch)  # [source rank = sequence slice, B, T/cp, H/cp, c]
        return got.transpose(0, 1).reshape(bsz, cp * seq, heads // cp, ch)

    def heads_to_seq(self, y: Tensor) -> Tensor:
        """``[B, T, H/cp, c]`` -> ``[B, T/cp, H, c]``: the inverse of :meth:`seq_to_heads`."""
        bsz, seq, heads, ch = y.shape
        cp = self.size
        send = y.reshape(bsz, cp, seq // cp, heads, ch).transpose(0, 1).contiguous()
        got = _wait(funcol.all_to_all_single(send.flatten(0, 1), None, None, self.group))
        got = got.view(cp, bsz, seq // cp, heads, ch)  # [source rank = head group, B, T/cp, H/cp, c]
        return got.permute(1, 2, 0, 3, 4).reshape(bsz, seq // cp, cp * heads, ch)

    def head_slice(self, heads: int) -> slice:
        """The heads this rank computes after :meth:`seq_to_heads`."""
        per = heads // self.size
        return slice(self.rank * per, (self.rank + 1) * per)

    # --- the sequence around the exchange ------------------------------------------------------------------------

    def halo(self, x: Tensor, width: int, carried: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The ``width`` inputs before this rank's slice ``x [B, T/cp, C]``: the carried tail of a causal conv, so
        that it computes on its slice what it computes on the whole sequence. The first rank takes ``carried`` (the
        previous chunk's tail, under state passing) or zeros. Also returns the whole sequence's last ``width``
        inputs (detached): the tail a cache carries to the next chunk, the same on every rank."""
        if width == 0:
            return x[:, :0], x[:, :0].detach()
        tails = funcol.all_gather_single_autograd(x[:, -width:].contiguous(), 0, self.group)
        tails = _wait(tails).view(self.size, *x.shape[:1], width, x.shape[2])
        # the first rank takes zeros through the same graph: every rank must run the gather's backward
        past = tails[self.rank - 1] * (1.0 if self.rank > 0 else 0.0)
        if self.rank == 0 and carried is not None:
            past = past + carried.to(past.dtype)
        return past, tails[-1].detach()

    def gather_seq(self, x: Tensor | None) -> Tensor | None:
        """The whole sequence of a ``[B, T/cp, ...]`` tensor that needs no gradient (document starts)."""
        if x is None:
            return None
        parts = [torch.empty_like(x, dtype=torch.uint8) for _ in range(self.size)]
        dist.all_gather(parts, x.to(torch.uint8).contiguous(), group=self.group)
        return torch.cat(parts, dim=1).to(x.dtype)

    def gather_heads(self, cache) -> None:
        """Make a cache whose TTT states and attention keys/values hold this rank's heads (after a split forward)
        whole again, in place: every rank then holds every head and can continue the sequence on its own."""
        for layer in cache.layers:
            if layer.ttt is not None:
                layer.ttt = tuple(self._all_heads(t) for t in layer.ttt)
            if layer.pending is not None:
                layer.pending = tuple(self._all_heads(t) for t in layer.pending)
            if layer.keys is not None:
                layer.keys, layer.values = self._all_heads(layer.keys), self._all_heads(layer.values)

    def _all_heads(self, t: Tensor) -> Tensor:
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.detach().contiguous(), group=self.group)
        return torch.cat(parts, dim=1)

    def sum_over_group(self, t: Tensor) -> Tensor:
        """The sum of ``t`` over the context group (a new tensor; no gradient)."""
        out = t.detach().clone()
        dist.all_reduce(out, group=self.group)
        return out

    def token_mean_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """This rank's share of the whole sequence's mean cross-entropy, scaled by ``cp``: the mean over the group
        (what a data-parallel average of gradients and losses takes) is the token-weighted mean of all slices."""
        total = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        count = (labels != -100).sum().to(total.dtype)
        dist.all_reduce(count, group=self.group)
        return total * self.size / count

    def local_batch(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """This rank's slice of every sequence of a batch: inputs and labels (already aligned, so a slice of each
        is exact at its edges) and the per-mini-batch ``doc_start`` flags."""
        out = {}
        for key, value in batch.items():
            if value.dim() >= 2 and key in ("input_ids", "labels", "doc_start"):
                part = value.shape[1] // self.size
                value = value[:, self.rank * part : (self.rank + 1) * part]
            out[key] = value
        return out

    def position_offset(self, local_len: int) -> int:
        """The absolute position of this rank's first token (slices are equal and in rank order)."""
        return self.rank * local_len

    def check_slice(self, local_len: int, offset: int, config, mixers: list[str]) -> None:
        """Refuse, in one line, what the split cannot compute exactly: heads that ``cp`` does not divide, a slice
        that is not whole mini-batches, a cached sequence that stopped inside a mini-batch (``offset`` tokens)."""
        multiple = config.mini_batch_size if "ttt" in mixers else 1
        if offset % multiple:
            raise LayoutError(f"distributed.context_parallel > 1 continues a cached sequence only at a mini-batch "
                                f"boundary ({offset} tokens are not a multiple of {multiple})")
        check_split(self.size, config.num_attention_heads, config.num_key_value_heads, local_len * self.size,
                    multiple)


def check_split(cp: int, heads: int, kv_heads: int, seq_len: int | None, multiple: int) -> None:
    """``distributed.context_parallel=cp`` needs ``cp`` to divide the heads (and K/V heads), and ``seq_len`` to be a
    multiple of ``cp * multiple`` (``multiple``: the TTT mini-batch size, so every slice holds whole mini-batches)."""
    if heads % cp or kv_heads % cp:
        raise LayoutError(f"distributed.context_parallel={cp} must divide the attention heads ({heads}) and "
                            f"key/value heads ({kv_heads})")
    if seq_len is not None and seq_len % (cp * multiple):
        raise LayoutError(f"distributed.context_parallel={cp}: the sequence length {seq_len} must be a multiple of "
                            f"{cp * multiple} (cp x mini-batch size {multiple})")


def enable(model: nn.Module, context: ContextParallel | None) -> None:
    """Give ``model``'s context-parallel slots the group (``None``: off again). A slot is an attribute ``context``
    that a module sets to ``None`` in its constructor (the model, its blocks, TTT and attention layers), so this
    layer needs no import of the model's classes. Refuses heads that the group does not divide."""
    for module in model.modules():
        slot = vars(module).get("context", False)
        if slot is not None and not isinstance(slot, ContextParallel):
            continue
        module.context = context
        cfg = getattr(module, "config", None)
        if context is not None and hasattr(cfg, "num_key_value_heads"):
            check_split(context.size, cfg.num_attention_heads, cfg.num_key_value_heads, None, 1)


def build_mesh(device_type: str, world_size: int, cp: int):
    """The 2-D ``(data, context)`` mesh: ``cp`` consecutive ranks split each sequence, ``world / cp`` such groups
    take different sequences. Refuses a ``cp`` that does not divide the world."""
    from torch.distributed.device_mesh import init_device_mesh

    if cp < 1 or world_size % cp:
        raise LayoutError(f"distributed.context_parallel={cp} must divide the number of processes ({world_size})")
    return init_device_mesh(device_type, (world_size // cp, cp), mesh_dim_names=("data", "context"))


def _wait(t: Tensor) -> Tensor:
    return funcol.wait_tensor(t) if isinstance(t, funcol.AsyncCollectiveTensor) else t
