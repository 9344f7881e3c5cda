"""The prefetcher's hand-over on a real GPU: the batch check sees the race an untied hand-over has, and the
prefetcher's own hand-over has none.

The consumer queues long GPU work before it reads each batch and never syncs, as a compiled training step does, so
the CPU runs far ahead and drops batches whose readers have not run yet.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tttexp.data import integrity
from tttexp.data.loaders import WindowLoader
from tttexp.data.prefetch import Prefetcher

pytestmark = pytest.mark.gpu


class UntiedPrefetcher(Prefetcher):
    """The hand-over the prefetcher had before: the copy is complete, but the memory stays the side stream's."""

    def _hand_over(self, batch, copied) -> None:
        copied.synchronize()


def _changed_batches(prefetcher_class: type[Prefetcher], steps: int = 300) -> int:
    device = torch.device("cuda")
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 32000, size=int(n)).astype(np.uint16) for n in rng.integers(200, 4000, size=400)]
    loader = integrity.Fingerprinted(WindowLoader(docs, eos_id=0, seq_len=2048, batch_size=8, seed=0))
    prefetcher = prefetcher_class(loader, device, host_keys=(integrity.KEY,))
    work = torch.randn(4096, 4096, device=device)
    changed = torch.zeros((), dtype=torch.long, device=device)
    try:
        for _ in range(steps):
            batch = next(prefetcher)
            for _ in range(4):  # about a millisecond of GPU work queued before the batch is read
                work = torch.tanh(work @ work)
            changed += integrity.changed(batch)
            del batch
        return int(changed)
    finally:
        prefetcher.close()


@pytest.fixture(autouse=True)
def _gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


def test_the_batch_check_catches_an_untied_hand_over():
    assert _changed_batches(UntiedPrefetcher) > 0


def test_the_prefetcher_hands_over_batches_that_stay_intact():
    assert _changed_batches(Prefetcher) == 0
