"""A checkable record of the training data a run consumed: a chained hash of every batch's token ids.

Two runs with the same hash read the same tokens in the same order; the comparison study asserts that across its
arms. The chain (``digest = blake2b(previous digest + batch bytes)``) can be carried through a checkpoint, so a
resumed run ends with the hash an uninterrupted one would have.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


class TokenHash:
    """Chained hash of the training token stream (``update`` once per micro-batch, in order)."""

    def __init__(self, digest: str = "") -> None:
        self.digest = digest
        self.batches = 0
        self.tokens = 0

    def update(self, input_ids: torch.Tensor) -> None:
        """Add one batch. Batches already on an accelerator are skipped (hashing them would sync the host):
        the record is complete when the loader hands out CPU batches, as it does without prefetching."""
        if input_ids.device.type != "cpu":
            return
        data = np.ascontiguousarray(input_ids.numpy().astype(np.int64, copy=False))
        h = hashlib.blake2b(bytes.fromhex(self.digest), digest_size=16)
        h.update(np.asarray(data.shape, np.int64).tobytes())
        h.update(data.tobytes())
        self.digest = h.hexdigest()
        self.batches += 1
        self.tokens += int(data.size)

    def state_dict(self) -> dict[str, object]:
        return {"digest": self.digest, "batches": self.batches, "tokens": self.tokens}

    def load_state_dict(self, state: dict | None) -> None:
        if state:
            self.digest = str(state.get("digest", ""))
            self.batches = int(state.get("batches", 0))
            self.tokens = int(state.get("tokens", 0))
