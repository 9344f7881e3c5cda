"""Context parallelism: the cost of its wrappers, and the all-to-all volume per layer.

    python benchmarks/bench_cp.py --size 125m --seq 8192 --cp 1 --out benchmarks/results/
    python benchmarks/bench_cp.py --device cpu --size tiny --seq 256 --steps 2     # checks the script on the CPU
    torchrun --nproc_per_node=2 benchmarks/bench_cp.py --size 125m --seq 16384 --cp 2

One run times training steps (forward, backward, AdamW; bf16 autocast and the Triton kernels on a GPU, fp32 and the
torch kernels on the CPU) of the same model twice, alternating: as it is ("plain"), and with the context-parallel
wrappers on (``tttexp.distributed.context.enable``: the all-to-all around every TTT and attention layer, the conv
halos, the group-weighted loss). At world size 1 (``--cp 1``) the exchange moves nothing, so the difference is the
wrappers' own cost (copies into and out of the collective, the halo gather). Under torchrun with ``--cp N`` each rank
takes its ``seq / N`` slice in the context arm and the whole sequence in the plain arm; tokens/s count the whole
sequences of the group.

The all-to-all volume is measured as the bytes each rank hands to the exchange per layer and step (forward and
backward; with ``--checkpointing`` the recomputed forward too), and scaled to other degrees: a rank sends
``(cp - 1) / cp`` of what it hands over, and hands over ``1 / cp`` of the sequence. The formula printed beside it:
a TTT layer sends ``B T (cp - 1) / cp^2 x (3 d a + H l + d a)`` bytes per direction (q, k, v and the learning rate
of each head in, the output back; ``a``, ``l``: bytes of an activation and of the learning rate), an attention layer
``B T (cp - 1) / cp^2 x (d + 2 d_kv + d) a``; the backward sends the same again.

Prints a JSON object; ``--out`` (a folder, or a ``.json`` file) writes it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import time

import torch
from common import VOCAB, commit, sync, write_result

from tttexp.distributed import context as cpx
from tttexp.distributed.world import free_port
from tttexp.models import SIZE_PRESETS, build_model


def formula_bytes(*, batch: int, seq: int, hidden: int, heads: int, kv_heads: int, cp: int, mixer: str,
                  act_bytes: int, lr_bytes: int) -> int:
    """Bytes one rank sends in one layer's forward exchanges (there and back) at context-parallel degree ``cp``."""
    share = batch * seq * (cp - 1) / cp**2
    if mixer == "ttt":
        return round(share * ((3 * hidden + hidden) * act_bytes + heads * lr_bytes))
    kv = hidden // heads * kv_heads
    return round(share * (hidden + 2 * kv + hidden) * act_bytes)


@contextlib.contextmanager
def counting(cp: cpx.ContextParallel):
    """Count the bytes this rank hands to ``cp``'s all-to-all (forward and backward) and to its halo gathers
    (forward) while inside; the exchange is as it was afterwards. Yields the counts."""
    counts = {"all_to_all": 0, "halo": 0}

    class Counted(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            counts["all_to_all"] += x.numel() * x.element_size()
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            counts["all_to_all"] += grad.numel() * grad.element_size()
            return grad

    seq_to_heads, heads_to_seq, halo = cp.seq_to_heads, cp.heads_to_seq, cp.halo

    def counted_halo(x, width, carried=None):
        counts["halo"] += x.shape[0] * width * x.shape[2] * x.element_size()
        return halo(x, width, carried)

    cp.seq_to_heads = lambda x: seq_to_heads(Counted.apply(x))
    cp.heads_to_seq = lambda y: heads_to_seq(Counted.apply(y))
    cp.halo = counted_halo
    try:
        yield counts
    finally:
        del cp.seq_to_heads, cp.heads_to_seq, cp.halo  # the methods again


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="125m", help=f"one of {', '.join(SIZE_PRESETS)}")
    parser.add_argument("--layer", default="linear", help="linear | mlp")
    parser.add_argument("--backbone", default="mamba", help="mamba | transformer")
    parser.add_argument("--mixer", default="ttt", help="ttt | attention (the Transformer++ arm)")
    parser.add_argument("--seq", type=int, default=8192, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=1, help="sequences per step")
    parser.add_argument("--cp", type=int, default=1, help="context-parallel degree (the world size under torchrun)")
    parser.add_argument("--volume-cp", default="2,4,8", help="more degrees to print the all-to-all volume for")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per arm and round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per arm first (compilation here)")
    parser.add_argument("--rounds", type=int, default=3, help="plain / context alternations")
    parser.add_argument("--compile", action="store_true", help="compile each block (torch.compile)")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing of each block")
    parser.add_argument("--kernel", default="auto", help="auto | triton | torch")
    parser.add_argument("--device", default="cuda", help="cuda | cpu (cpu: fp32, torch kernels)")
    parser.add_argument("--out", default=None, help="a folder or a .json file for the result")
    args = parser.parse_args()

    import torch.distributed as dist

    if "WORLD_SIZE" not in os.environ:  # alone: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = args.device == "cuda"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    mesh = cpx.build_mesh(device.type, world, args.cp)
    cp = cpx.ContextParallel(mesh.get_group("context"))

    torch.manual_seed(0)
    preset = SIZE_PRESETS[args.size]
    model = build_model(vocab_size=VOCAB, **preset, ttt_layer=args.layer, backbone=args.backbone, mixer=args.mixer,
                        kernel=args.kernel if cuda else "torch", gradient_checkpointing=args.checkpointing)
    model = model.to(device).train()
    config = model.config
    cpx.check_split(args.cp, config.num_attention_heads, config.num_key_value_heads, args.seq,
                    config.mini_batch_size if args.mixer == "ttt" else 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=cuda)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (args.batch, args.seq + 1), generator=g).to(device)
    part = args.seq // args.cp
    mine = slice(cp.rank * part, (cp.rank + 1) * part)

    def step(split: bool) -> None:
        inputs, labels = (ids[:, :-1][:, mine], ids[:, 1:][:, mine]) if split else (ids[:, :-1], ids[:, 1:])
        with autocast:
            loss = model(inputs, labels=labels, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def timed(split: bool, steps: int) -> float:
        cpx.enable(model, cp if split else None)
        sync(cuda)
        start = time.perf_counter()
        for _ in range(steps):
            step(split)
        sync(cuda)
        return time.perf_counter() - start

    with counting(cp) as handed:  # one eager step of the context arm, its exchanges counted
        timed(True, 1)
    if args.compile:
        for block in model.blocks():
            block.compile()
    for split in (False, True):  # compile and warm up both arms
        timed(split, args.warmup)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rates: dict[str, list[float]] = {"plain": [], "context": []}
    peaks: dict[str, float] = {}
    for _ in range(args.rounds):
        for split, arm in ((False, "plain"), (True, "context")):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            seconds = timed(split, args.steps)
            rates[arm].append(args.batch * args.seq * args.steps / seconds)
            if cuda:
                peaks[arm] = max(peaks.get(arm, 0.0), torch.cuda.max_memory_allocated() / 2**30)
    cpx.enable(model, None)

    plain, context_rate = statistics.median(rates["plain"]), statistics.median(rates["context"])
    act_bytes = 2 if cuda else 4
    passes = 3 if args.checkpointing else 2  # forward and backward (and the recomputed forward)
    layers = len(model.blocks())
    mixer = config.mixer(0)
    volume = []
    for degree in sorted({args.cp, *(int(c) for c in args.volume_cp.split(",") if c)}):
        # at this degree a rank holds seq / degree tokens and sends (degree - 1) / degree of what it hands over
        scale = args.cp / degree * (degree - 1) / degree
        volume.append({
            "cp": degree,
            "bytes_per_layer_per_step": round(handed["all_to_all"] / layers * scale),
            "formula_bytes_per_layer_per_step": passes * formula_bytes(
                batch=args.batch, seq=args.seq, hidden=config.hidden_size, heads=config.num_attention_heads,
                kv_heads=config.num_key_value_heads, cp=degree, mixer=mixer, act_bytes=act_bytes, lr_bytes=4),
            # each rank's halo goes to the cp - 1 others, and its gradient comes back the same way
            "halo_bytes_per_layer_per_step": round(2 * handed["halo"] / layers * (degree - 1)),
        })
    result = {
        "benchmark": "context_parallel",
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "date": datetime.date.today().isoformat(),
        "commit": commit(),
        "torch": torch.__version__,
        "size": args.size, "ttt_layer": args.layer, "backbone": args.backbone, "mixer": args.mixer,
        "parameters": sum(p.numel() for p in model.parameters()),
        "world_size": world, "cp": args.cp, "seq": args.seq, "batch": args.batch,
        "precision": "bf16" if cuda else "fp32", "kernel": model.resolved_kernel(device.type),
        "compile": args.compile, "activation_checkpointing": args.checkpointing,
        "steps": args.steps, "rounds": args.rounds,
        "tokens_per_sec_plain": plain, "tokens_per_sec_context": context_rate,
        "overhead": plain / context_rate - 1.0,
        "tokens_per_sec_rounds": rates,
        "peak_memory_gib": peaks or None,
        "all_to_all_handed_bytes_per_layer_per_step": handed["all_to_all"] / layers,
        "all_to_all_volume": volume,
    }
    if rank == 0:
        print(json.dumps(result, indent=2))
        print(f"wrappers' overhead at cp={args.cp}: {100 * result['overhead']:+.1f}% "
              f"({context_rate:,.0f} vs {plain:,.0f} tokens/s)")
        for row in volume:
            print(f"cp={row['cp']}: all-to-all {row['bytes_per_layer_per_step'] / 2**20:,.1f} MiB per layer per step "
                  f"and rank (formula {row['formula_bytes_per_layer_per_step'] / 2**20:,.1f} MiB), halo "
                  f"{row['halo_bytes_per_layer_per_step'] / 2**10:,.1f} KiB")
        if args.out:
            write_result(result, args.out, f"cp-{args.size}-{args.seq}-cp{args.cp}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
