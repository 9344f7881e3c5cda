"""Background batch preparation: the next batches are pinned and copied to the device while the GPU works."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import torch

Batch = dict[str, torch.Tensor]


class Prefetcher:
    """Wraps a loader; a worker thread keeps ``depth`` batches ready (pinned, already sent to ``device``).

    The wrapped loader's own ``state_dict`` runs ahead of what the loop consumed, so each queued batch carries
    the loader's position just after it; ``state_dict`` reports the position after the last consumed batch.
    """

    def __init__(self, loader: Any, device: torch.device, depth: int = 2) -> None:
        self.loader = loader
        self.device = device
        self.depth = depth
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._next_state = loader.state_dict()
        self._thread: threading.Thread | None = None

    @property
    def tokens_per_batch(self) -> int:
        return self.loader.tokens_per_batch

    @property
    def batch_size(self) -> int:
        return self.loader.batch_size

    def _work(self) -> None:
        pin = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if pin else None
        while not self._stop.is_set():
            try:
                batch = next(self.loader)
            except Exception as err:  # noqa: BLE001 - re-raised in the consumer
                self._queue.put((None, err))
                return
            state = self.loader.state_dict()
            if pin:
                with torch.cuda.stream(stream):
                    batch = {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in batch.items()}
                stream.synchronize()
            while not self._stop.is_set():
                try:
                    self._queue.put((state, batch), timeout=0.1)
                    break
                except queue.Full:
                    continue

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, daemon=True, name="tttexp-prefetch")
            self._thread.start()
        state, batch = self._queue.get()
        if isinstance(batch, Exception):
            raise batch
        self._next_state = state
        return batch

    def state_dict(self) -> dict[str, int]:
        """The loader position of the next batch the loop will take (exact resume)."""
        return dict(self._next_state)

    def load_state_dict(self, state: dict[str, int]) -> None:
        if self._thread is not None:
            raise RuntimeError("load_state_dict must come before the first batch")
        self.loader.load_state_dict(state)
        self._next_state = self.loader.state_dict()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

