"""State passing and sharded checkpoints at context-parallel degrees that need 4 gloo processes (extended; the
2-process cases run in test_context.py): cp=4 and cp=2 x dp=2 log the losses of one process or of an uninterrupted
run of their layout, under DDP and FSDP, and their checkpoints continue across the two layouts and on one process."""

from __future__ import annotations

import json

import pytest
import torch.multiprocessing as mp

from support import one_thread
from tttexp.distributed.world import free_port

from . import context_run_worker as W
from .test_context import CKPT, assert_same


@pytest.mark.extended
def test_state_passing_and_resume_on_four_ranks(tmp_path, app_cache):
    heads = ["model.num_attention_heads=4"]
    with one_thread():
        one = W.train(W.overrides(1, 1, *heads), tmp_path / "one", app_cache)
    cases = [
        ["cp4", 4, 1, heads, None],
        ["cp2dp2", 2, 2, heads, None],
        ["cp2dp2_from_cp4", 2, 2, heads, f"cp4/{CKPT}"],   # one head per rank -> two; both rows -> one per group
        ["cp4_from_cp2dp2", 4, 1, heads, f"cp2dp2/{CKPT}"],
        ["fsdp_cp2dp2", 2, 2, [*heads, "distributed=fsdp"], None],
    ]
    mp.spawn(W.run_rank, args=(4, free_port(), str(tmp_path), str(app_cache), cases), nprocs=4, join=True)
    runs = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name, *_ in cases}
    with one_thread():
        one_from_cp2dp2 = W.train(W.overrides(1, 1, *heads), tmp_path / "one_from_cp2dp2", app_cache,
                                  resume=tmp_path / "cp2dp2" / CKPT)
    every, after = range(1, W.STEPS + 1), range(W.HALF + 1, W.STEPS + 1)
    assert_same(runs["cp4"], one, every, ("train/loss", "state/w_norm", "val/loss"))
    assert_same(runs["cp4_from_cp2dp2"], one, after, ("train/loss", "state/w_norm"))
    assert_same(one_from_cp2dp2, one, after, ("train/loss", "state/w_norm"))
    assert_same(runs["cp2dp2_from_cp4"], runs["cp2dp2"], after, ("train/loss", "state/w_norm"))
    assert_same(runs["fsdp_cp2dp2"], runs["cp2dp2"], every, ("train/loss", "state/w_norm", "val/loss"))
