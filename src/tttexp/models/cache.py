"""TTTCache: everything needed to continue a sequence — the inner states, pending updates and conv tails."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from tttexp.ops.reference import State


@dataclass
class LayerState:
    """One layer's recurrent state.

    ``ttt`` is the inner state at the start of the current mini-batch; ``pending`` the accumulated, not yet
    applied updates of the tokens already seen in it (``None`` at a mini-batch boundary); ``convs`` the last
    ``conv_kernel - 1`` inputs of each causal conv, by name.
    """

    ttt: State | None = None
    pending: State | None = None
    convs: dict[str, Tensor] = field(default_factory=dict)

    def tensors(self) -> list[Tensor]:
        return [*(self.ttt or ()), *(self.pending or ()), *self.convs.values()]


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
        for src, dst in zip(self.layers, out.layers, strict=True):
            dst.ttt = None if src.ttt is None else tuple(t.detach() for t in src.ttt)
            dst.pending = None if src.pending is None else tuple(t.detach() for t in src.pending)
            dst.convs = {k: v.detach() for k, v in src.convs.items()}
        return out

    def state_dict(self) -> dict[str, object]:
        """Plain tensors and ints, safe for ``torch.save`` / ``torch.load(weights_only=True)``."""
        return {
            "seqlen_offset": self.seqlen_offset,
            "layers": [
                {
                    "ttt": list(layer.ttt) if layer.ttt is not None else None,
                    "pending": list(layer.pending) if layer.pending is not None else None,
                    "convs": dict(layer.convs),
                }
                for layer in self.layers
            ],
        }

    @classmethod
    def from_state_dict(cls, state: dict, device: torch.device | str | None = None) -> TTTCache:
        layers = state["layers"]
        out = cls(len(layers))
        out.seqlen_offset = int(state["seqlen_offset"])

        def move(ts):
            return None if ts is None else tuple(t.to(device) for t in ts)

        for src, dst in zip(layers, out.layers, strict=True):
            dst.ttt = move(src["ttt"])
            dst.pending = move(src["pending"])
            dst.convs = {k: v.to(device) for k, v in src["convs"].items()}
        return out

    def reorder(self, index: Tensor) -> None:
        """Select batch rows (beam search)."""
        for layer in self.layers:
            layer.ttt = None if layer.ttt is None else tuple(t.index_select(0, index) for t in layer.ttt)
            layer.pending = None if layer.pending is None else tuple(t.index_select(0, index) for t in layer.pending)
            layer.convs = {k: v.index_select(0, index) for k, v in layer.convs.items()}
