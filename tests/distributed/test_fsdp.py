"""distributed=fsdp: FSDP2 on 2 gloo processes trains like one process, shards its bytes, and its checkpoints
continue at other world sizes and under other layers (the reshard rule)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.multiprocessing as mp

from tttexp.distributed.fsdp import FullyShardedDataParallel, check_mesh
from tttexp.distributed.layout import BLOCKS_FROM, ProcessLayout
from tttexp.errors import LayoutError
from tttexp.training import reshard

from . import fsdp_worker as W

RTOL = 1e-5  # fp32: the two runs differ only in the order of floating-point sums


def assert_same_losses(got: dict, want: dict, steps: range) -> None:
    got = {int(k): v for k, v in got.items()}
    assert [s for s in steps if s not in got] == []
    worst = max(abs(got[s] - want[s]) / abs(want[s]) for s in steps)
    assert worst < RTOL, f"largest relative loss difference {worst:.2e} over steps {steps.start}-{steps.stop - 1}"


@pytest.fixture
def one_thread():
    """Tiny ops run fastest on one thread (and the two workers take a core each)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_two_process_fsdp_matches_one_process_shards_and_reshards(tmp_path, app_cache, one_thread):
    # One process: the uninterrupted runs (TTT-Linear writes a sharded checkpoint at step 10 for the 1 -> 2 case).
    single, single_linear = W.train(W.overrides("linear", 1, "single", "distributed.checkpoint=dcp",
                                                f"trainer.ckpt_every={W.HALF}"), tmp_path / "single_linear", app_cache)
    full_bytes = W.local_bytes(single)
    _, single_mlp = W.train(W.overrides("mlp", 1, "single"), tmp_path / "single_mlp", app_cache)

    from tttexp.distributed.world import free_port

    mp.spawn(W.run_rank, args=(2, free_port(), str(tmp_path), str(app_cache)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    every = range(1, W.STEPS + 1)
    after = range(W.HALF + 1, W.STEPS + 1)

    # 2-process FSDP == 1 process on the same global batch, for both inner models
    assert_same_losses(ranks[0]["fsdp_linear"], single_linear, every)
    assert_same_losses(ranks[0]["fsdp_mlp"], single_mlp, every)
    # activation checkpointing inside the sharded blocks recomputes the same forward
    assert_same_losses(ranks[0]["fsdp_checkpointed"], single_linear, every)
    # 1 -> 2: a one-process checkpoint continued by FSDP at world size 2; DDP -> FSDP likewise
    assert_same_losses(ranks[0]["fsdp_from_single"], single_linear, after)
    assert_same_losses(ranks[0]["ddp"], single_linear, every)
    assert_same_losses(ranks[0]["fsdp_from_ddp"], single_linear, after)
    # 2 -> 1: FSDP's sharded checkpoint continued on one process
    _, from_fsdp = W.train(W.overrides("linear", 1, "single"), tmp_path / "single_from_fsdp", app_cache,
                           resume=tmp_path / "fsdp_linear/checkpoints/step-00000010.dcp")
    assert_same_losses(from_fsdp, single_linear, after)

    # bf16: blocks compute with bf16 parameters, the TTT layers keep fp32 ones; gradients are fp32 shards
    bf16 = ranks[0]["bf16"]
    assert (bf16["mlp"], bf16["ttt_state"], bf16["ttt_proj"], bf16["grads"]) == \
        ("torch.bfloat16", "torch.float32", "torch.float32", ["torch.float32"])
    ids = W.bf16_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        autocast_loss = float(W.tiny_mlp_model()(ids[:, :-1], labels=ids[:, 1:], use_cache=False).loss)
    assert abs(bf16["loss"] - autocast_loss) < 2e-2 * autocast_loss  # bf16 rounding, not a different model

    # parameters and optimizer state: each of 2 ranks holds about half of what one process holds
    for r in ranks:
        for kind in ("params", "optim"):
            share = r["bytes"][kind] / full_bytes[kind]
            assert 0.45 < share < 0.56, f"{kind}: a rank holds {share:.3f} of the one-process bytes"


def test_replicate_must_divide_the_world():
    check_mesh(2, 4)
    with pytest.raises(LayoutError, match=r"distributed.replicate=3 does not divide the world size 4"):
        check_mesh(3, 4)


def test_bf16_keeps_the_ttt_layers_fp32_and_reduces_in_fp32():
    blocks, ttt = FullyShardedDataParallel(precision="bf16").precision_policies()
    assert blocks.param_dtype == torch.bfloat16 and blocks.reduce_dtype == torch.float32
    assert ttt.param_dtype == torch.float32 and ttt.reduce_dtype == torch.float32
    default, none = FullyShardedDataParallel(precision="fp32").precision_policies()
    assert default.param_dtype is None and none is None


@pytest.mark.parametrize(("setting", "parameters", "expected"), [
    ("auto", BLOCKS_FROM, "blocks"), ("auto", BLOCKS_FROM - 1, "model"), ("blocks", 10, "blocks"),
    (True, BLOCKS_FROM, "model"), (False, BLOCKS_FROM, None),
])
def test_compile_rule(setting, parameters, expected):
    model = torch.nn.Linear(1, parameters, bias=False, device="meta")
    assert ProcessLayout(compile=setting).compile_mode(model) == expected


def test_carried_rows_are_re_split_by_global_row():
    def carry(rows: torch.Tensor) -> dict:
        return {"seqlen_offset": 32, "layers": [{"ttt": [rows, rows + 100], "pending": None, "convs": {"q": rows}}]}

    saved = {"world_size": 2, "global_rows": 4, "ranks": [
        {"data": {"epoch": 0, "position": 3}, "rng": None, "carry": carry(torch.tensor([0.0, 1.0]))},
        {"data": {"epoch": 0, "position": 3}, "rng": None, "carry": carry(torch.tensor([2.0, 3.0]))},
    ]}
    one = reshard.rank_state(saved, 0, 1, rows_per_rank=4, stream=True)
    assert one["carry"]["layers"][0]["ttt"][0].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert one["carry"]["seqlen_offset"] == 32 and one["data"] == {"epoch": 0, "position": 3}
    four = [reshard.rank_state(saved, r, 4, rows_per_rank=1, stream=True) for r in range(4)]
    assert [f["carry"]["layers"][0]["convs"]["q"].tolist() for f in four] == [[0.0], [1.0], [2.0], [3.0]]
    with pytest.raises(Exception, match="4 document streams"):
        reshard.rank_state(saved, 0, 1, rows_per_rank=2, stream=True)


def test_window_position_counts_global_windows():
    saved = {"world_size": 2, "global_rows": 4, "ranks": [{"data": {"epoch": 1, "position": 6}, "rng": None}] * 2}
    assert reshard.rank_state(saved, 0, 1, rows_per_rank=4, stream=False)["data"] == {"epoch": 1, "position": 6}
    assert reshard.rank_state(saved, 0, 1, rows_per_rank=8, stream=False)["data"] == {"epoch": 1, "position": 3}
    assert reshard.rank_state(saved, 0, 1, rows_per_rank=8, stream=False, batches_per_epoch=3)["data"] == \
        {"epoch": 2, "position": 0}
