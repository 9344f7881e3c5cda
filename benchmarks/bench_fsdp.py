"""One GPU, FSDP at world size 1: training steps of a paper-size TTT model with per-block compile, through the
project's own process layer (``tttexp.distributed.FullyShardedDataParallel``) and its trainer's step pieces
(bf16 autocast + FSDP mixed precision, grad clipping, fused AdamW). No Hydra.

    python benchmarks/bench_fsdp.py                          # 1.3b TTT-Linear, 8 x 2048, blocks compile
    python benchmarks/bench_fsdp.py --size 125m --steps 3 --out benchmarks/results

Prints and (with ``--out DIR``) writes ``fsdp-<size>-<date>-<device>.json``: peak memory, tokens/s of the timed
steps (after ``--warmup`` steps, which include compilation), the compile and sharding settings, device, date and
commit. Under torchrun (``torchrun --nproc_per_node=N benchmarks/bench_fsdp.py``) the same script runs N ranks.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import torch
from common import VOCAB, commit, sync, ttt, write_result

from tttexp.distributed.world import free_port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1.3b", help="125m | 350m | 760m | 1.3b")
    parser.add_argument("--layer", default="linear", help="linear | mlp")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step (per rank)")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    parser.add_argument("--compile", default="blocks", help="blocks | true | false | auto (trainer.compile)")
    parser.add_argument("--kernel", default="auto", help="auto | triton | torch")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing of each block")
    parser.add_argument("--no-reshard", action="store_true", help="reshard_after_forward=false")
    parser.add_argument("--device", default="cuda", help="cuda | cpu (cpu: fp32 eager, to check the script)")
    parser.add_argument("--out", default=None, help="folder for the JSON result")
    args = parser.parse_args()

    if "WORLD_SIZE" not in os.environ:  # alone: a world of one on this machine
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    from tttexp.distributed import FullyShardedDataParallel

    compile_setting = {"true": True, "false": False}.get(args.compile, args.compile)
    layout = FullyShardedDataParallel(precision="bf16", compile=compile_setting, tf32=True,
                                      reshard_after_forward=not args.no_reshard, label="bench_fsdp")
    device = layout.setup(args.device, seed=0)
    cuda = device.type == "cuda"
    model = ttt(args.size, args.layer, args.checkpointing, args.kernel)
    params = sum(p.numel() for p in model.parameters())
    wrapped = layout.prepare_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    ids = torch.randint(0, VOCAB, (args.batch, args.context + 1), device=device)
    inputs, labels = ids[:, :-1], ids[:, 1:]

    def step() -> float:
        with layout.autocast():
            loss = wrapped(inputs, labels=labels, use_cache=False).loss
        loss.backward()
        layout.grad_norm([p for p in model.parameters() if p.grad is not None], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(layout.all_reduce_mean(loss.detach()))

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync(cuda)
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    losses = [step() for _ in range(args.steps)]
    sync(cuda)
    seconds = time.perf_counter() - start
    tokens = args.batch * args.context * args.steps * layout.world_size
    result = {
        "benchmark": "fsdp",
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "date": datetime.date.today().isoformat(),
        "commit": commit(),
        "torch": torch.__version__,
        "size": args.size,
        "ttt_layer": args.layer,
        "parameters": params,
        "world_size": layout.world_size,
        "batch_per_rank": args.batch,
        "context": args.context,
        "compile": str(layout.compile),
        "precision": layout.precision,
        "kernel": model.resolved_kernel(device.type),
        "activation_checkpointing": args.checkpointing,
        "reshard_after_forward": not args.no_reshard,
        "warmup_steps": args.warmup,
        "warmup_seconds": warmup_s,
        "timed_steps": args.steps,
        "step_ms": 1000.0 * seconds / args.steps,
        "tokens_per_sec": tokens / seconds,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "losses": losses,
    }
    if layout.is_main:
        print(json.dumps({k: v for k, v in result.items() if k != "losses"}, indent=2))
        if args.out:
            write_result(result, args.out, f"fsdp-{args.size}")
    layout.teardown()


if __name__ == "__main__":
    main()
