"""Context parallelism on gloo processes: the model with each sequence split over the context group computes what
one process computes on the whole sequence (logits, loss, every gradient), for TTT-Linear and TTT-MLP on both
backbones, the attention arm and a hybrid, with document starts; unfit splits are refused."""

from __future__ import annotations

import json

import pytest
import torch.multiprocessing as mp

from tttexp.distributed.world import free_port

from . import context_worker as W

RTOL = 1e-5  # fp32: the split changes only the order of floating-point sums
# Some gradients (the token weights, the gate bias) are sums that cancel to a small fraction of their terms: on one
# process fp32 is already 1e-4 off float64 there. Each tensor is therefore held to float64 (the split is exact up
# to rounding, so float64 rounding is all it may differ by), and fp32 to 1e-5 over the gradient as a whole.
RTOL64 = 1e-10


def spawn(tmp_path, world: int, cp: int) -> list[dict]:
    mp.spawn(W.run_rank, args=(world, cp, free_port(), str(tmp_path)), nprocs=world, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


def check(ranks: list[dict], cp: int) -> None:
    for rank, r in enumerate(ranks):
        assert set(r["results"]) == set(W.VARIANTS)
        for name, by_dtype in r["results"].items():
            # (the loss is computed in fp32 from either model's logits)
            for dtype, keys, tol in (("fp32", ("logits", "loss", "grads"), RTOL), ("fp64", ("loss",), RTOL),
                                     ("fp64", ("logits", "grad"), RTOL64)):
                worst = by_dtype[dtype]
                for key in keys:
                    assert worst[key] < tol, f"rank {rank}, {name}, {dtype}: {key} differs by {worst[key]:.2e} " \
                                             f"(worst gradient: {worst['grad_name']})"
        heads, seq = r["refusals"]
        assert f"context_parallel={cp} must divide the attention heads ({3 * cp + 1})" in heads
        assert f"sequence length {8 * cp} must be a multiple of {16 * cp}" in seq


def test_two_ranks_match_one_process(tmp_path):
    check(spawn(tmp_path, 2, 2), 2)


@pytest.mark.extended
def test_four_ranks_match_one_process(tmp_path):
    check(spawn(tmp_path, 4, 4), 4)


@pytest.mark.extended
def test_context_by_data_on_four_ranks(tmp_path):
    check(spawn(tmp_path, 4, 2), 2)
