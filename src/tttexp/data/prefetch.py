"""Background batch preparation: the next batches are pinned and copied to the device while the GPU works.

Why the hand-over is careful: a batch copied on a side CUDA stream belongs, for the caching allocator, to that
stream. If the consumer reads it on another stream and then drops it, the allocator may give its memory to the
side stream's next copy while kernels the consumer queued still read it: inputs silently change under a fast
(compiled) step that leaves the CPU far ahead of the GPU. So each handed-over batch carries an event that the
consumer's stream waits on (the copy is done before any reader runs), and every tensor is recorded on the
consumer's stream (``Tensor.record_stream``): its memory is reused only after the work queued there completes.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import torch

Batch = dict[str, torch.Tensor]


class Prefetcher:
    """Wraps a loader; a worker thread keeps ``depth`` batches ready (pinned and already sent to a CUDA
    ``device``; on other devices the thread only prepares them).

    The wrapped loader's own ``state_dict`` runs ahead of what the loop consumed, so each queued batch carries
    the loader's position just after it; ``state_dict`` reports the position after the last consumed batch, and
    ``load_state_dict`` (at any time) drops what was prepared and restarts from the given position.
    """

    def __init__(self, loader: Any, device: torch.device, depth: int = 2, host_keys: tuple[str, ...] = ()) -> None:
        self.loader = loader
        self.device = torch.device(device)
        self.host_keys = host_keys  # entries left on the host (a batch's fingerprint must not share its path)
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

    @property
    def batches_per_epoch(self) -> int | None:
        return getattr(self.loader, "batches_per_epoch", None)

    def _work(self) -> None:
        on_cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if on_cuda else None
        while not self._stop.is_set():
            try:
                batch = next(self.loader)
            except Exception as err:  # noqa: BLE001 - re-raised in the consumer
                self._put((None, err, None))
                return
            state = self.loader.state_dict()
            copied = None
            if on_cuda:
                with torch.cuda.stream(stream):
                    batch = {k: v if k in self.host_keys else v.pin_memory().to(self.device, non_blocking=True)
                             for k, v in batch.items()}
                    copied = torch.cuda.Event()
                    copied.record(stream)
            self._put((state, batch, copied))

    def _put(self, item: tuple) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._work, daemon=True, name="tttexp-prefetch")
            self._thread.start()
        state, batch, copied = self._queue.get()
        if isinstance(batch, Exception):
            raise batch
        if copied is not None:
            self._hand_over(batch, copied)
        self._next_state = state
        return batch

    def _hand_over(self, batch: Batch, copied: torch.cuda.Event) -> None:
        """Tie the batch to the stream that will read it (see the module docstring)."""
        consumer = torch.cuda.current_stream(self.device)
        consumer.wait_event(copied)
        for tensor in batch.values():
            if tensor.device.type == "cuda":
                tensor.record_stream(consumer)

    def state_dict(self) -> dict[str, int]:
        """The loader position of the next batch the loop will take (exact resume)."""
        return dict(self._next_state)

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from ``state``: batches already prepared are dropped."""
        self.close()
        self.loader.load_state_dict(state)
        self._next_state = self.loader.state_dict()

    def close(self) -> None:
        """Stop the worker and drop what it prepared (the loader goes back to the next unconsumed batch); the
        next batch starts it again."""
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():
            self._drain()
            self._thread.join(timeout=0.1)
        self._drain()
        self._thread = None
        self.loader.load_state_dict(self._next_state)

    def _drain(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return
