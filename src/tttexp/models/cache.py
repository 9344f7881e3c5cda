"""TTTCache: everything needed to continue a sequence — the inner states, pending updates and conv tails of TTT
layers, and the key/value cache of softmax-attention layers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tttexp.ops.reference import State


@dataclass
class LayerState:
    """One layer's recurrent state.

    ``ttt`` is the inner state at the start of the current mini-batch; ``pending`` the accumulated, not yet
    applied updates of the tokens already seen in it (``None`` at a mini-batch boundary); ``convs`` the last
    ``conv_kernel - 1`` inputs of each causal conv, by name. An attention layer keeps ``keys`` / ``values``
    ``[B, kv_heads, T_seen, F]`` (after RoPE) and, once document starts were given, ``doc_start [B]``: the index
    of the first key that the current document of each row may read.
    """

    ttt: State | None = None
    pending: State | None = None
    convs: dict[str, Tensor] = field(default_factory=dict)
    keys: Tensor | None = None
    values: Tensor | None = None
    doc_start: Tensor | None = None

    def tensors(self) -> list[Tensor]:
        kv = [t for t in (self.keys, self.values, self.doc_start) if t is not None]
        return [*(self.ttt or ()), *(self.pending or ()), *self.convs.values(), *kv]

    def map(self, fn: Callable[[Tensor], Tensor]) -> LayerState:
        """A new state with ``fn`` applied to every tensor."""
        return LayerState(
            ttt=None if self.ttt is None else tuple(fn(t) for t in self.ttt),
            pending=None if self.pending is None else tuple(fn(t) for t in self.pending),
            convs={k: fn(v) for k, v in self.convs.items()},
            keys=None if self.keys is None else fn(self.keys),
            values=None if self.values is None else fn(self.values),
            doc_start=None if self.doc_start is None else fn(self.doc_start),
        )


class TTTCache:
    """The model's recurrent state, following the ``cache_params`` convention of transformers' Mamba models.

    ``seqlen_offset`` counts the tokens consumed so far; all rows advance together.
    """

    def __init__(self, num_layers: int) -> None:
        self.seqlen_offset = 0
        self.layers = [LayerState() for _ in range(num_layers)]

    def detach(self) -> TTTCache:
        """A copy cut from the autograd graph (truncated backprop between training chunks)."""
        out = TTTCache(len(self.layers))
        out.seqlen_offset = self.seqlen_offset
        out.layers = [layer.map(Tensor.detach) for layer in self.layers]
        return out

    def keep_last_keys(self, max_keys: int) -> None:
        """Bound every attention layer's key/value cache to its last ``max_keys`` tokens (a sliding memory), so a
        stream carried across training chunks holds a fixed size; ``doc_start`` moves with the cut."""
        for layer in self.layers:
            if layer.keys is None or layer.keys.shape[2] <= max_keys:
                continue
            drop = layer.keys.shape[2] - max_keys
            layer.keys, layer.values = layer.keys[:, :, drop:], layer.values[:, :, drop:]
            if layer.doc_start is not None:
                layer.doc_start = (layer.doc_start - drop).clamp(min=0)

    def state_dict(self) -> dict[str, object]:
        """Plain tensors and ints, safe for ``torch.save`` / ``torch.load(weights_only=True)``."""
        return {
            "seqlen_offset": self.seqlen_offset,
            "layers": [
                {
                    "ttt": list(layer.ttt) if layer.ttt is not None else None,
                    "pending": list(layer.pending) if layer.pending is not None else None,
                    "convs": dict(layer.convs),
                    "keys": layer.keys,
                    "values": layer.values,
                    "doc_start": layer.doc_start,
                }
                for layer in self.layers
            ],
        }

    @classmethod
    def from_state_dict(cls, state: dict, device: torch.device | str | None = None) -> TTTCache:
        layers = state["layers"]
        out = cls(len(layers))
        out.seqlen_offset = int(state["seqlen_offset"])
        out.layers = [
            LayerState(
                ttt=None if src["ttt"] is None else tuple(src["ttt"]),
                pending=None if src["pending"] is None else tuple(src["pending"]),
                convs=dict(src["convs"]),
                keys=src.get("keys"),
                values=src.get("values"),
                doc_start=src.get("doc_start"),
            ).map(lambda t: t.to(device))
            for src in layers
        ]
        return out

    def reorder(self, index: Tensor) -> None:
        """Select batch rows (beam search)."""
        self.layers = [layer.map(lambda t: t.index_select(0, index)) for layer in self.layers]
