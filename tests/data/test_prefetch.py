"""The prefetching loader on the CPU: the same batches in the same order as its loader, exact positions for resume,
and a restart (after ``load_state_dict`` or ``close``) that neither skips nor repeats a batch."""

from __future__ import annotations

import numpy as np
import torch

from tttexp.data.loaders import WindowLoader
from tttexp.data.prefetch import Prefetcher


def _loader() -> WindowLoader:
    rng = np.random.default_rng(1)
    docs = [rng.integers(1, 500, size=int(n)).astype(np.uint16) for n in rng.integers(10, 80, size=60)]
    return WindowLoader(docs, eos_id=0, seq_len=16, batch_size=2, seed=3)


def _take(loader, n: int) -> list[torch.Tensor]:
    return [next(loader)["input_ids"] for _ in range(n)]


def test_prefetched_batches_and_positions_equal_the_loaders():
    expected_loader = _loader()
    prefetcher = Prefetcher(_loader(), torch.device("cpu"), depth=3)
    try:
        for _ in range(7):
            want = next(expected_loader)
            got = next(prefetcher)
            assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["labels"], want["labels"])
            assert prefetcher.state_dict() == expected_loader.state_dict()  # not the worker's, which runs ahead
    finally:
        prefetcher.close()


def test_resume_and_restart_continue_exactly():
    reference = _take(_loader(), 12)
    prefetcher = Prefetcher(_loader(), torch.device("cpu"))
    try:
        first = _take(prefetcher, 4)
        saved = prefetcher.state_dict()
        _take(prefetcher, 3)
        prefetcher.load_state_dict(saved)  # while the worker is running: what it prepared is dropped
        again = _take(prefetcher, 4)
        prefetcher.close()  # the worker had prepared batches 9 and 10: they are not lost
        rest = _take(prefetcher, 4)
    finally:
        prefetcher.close()
    got = first + again + rest
    for a, b in zip(got, reference[:4] + reference[4:8] + reference[8:12], strict=True):
        assert torch.equal(a, b)
    assert prefetcher.batches_per_epoch == _loader().batches_per_epoch
