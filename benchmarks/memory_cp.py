"""Per-GPU memory of a context-parallel training step: model states plus activations, from measured activation bytes
per token.

    python benchmarks/memory_cp.py --device cpu --markdown    # measure small widths on the CPU, scale: the table
    python benchmarks/memory_cp.py --device cuda --validate 4096
        # measure the 1.3b's own layers on a GPU (bf16, Triton) and check the estimate against a real step

The activations are what the forward saves for the backward (``torch.autograd.graph.saved_tensors_hooks``: distinct
storages, parameters left out), measured at one process for models of 1 and 2 layers, which separates a layer's
bytes per token from those of the embedding, the head and the loss, each over two sequence lengths, which leaves out
what does not grow with the sequence. On a GPU the layers are the target's own width
(bf16 autocast, the Triton kernels); on the CPU (fp32, the torch kernels) they are measured at two small widths of
the same head dimension and extrapolated linearly in the width. Under context parallelism every per-token activation
is split ``cp`` ways (the sequence-split parts hold ``T / cp`` tokens, the op's inputs ``H / cp`` heads of all ``T``
tokens: tests/distributed/test_context.py measures at most 0.6x per rank at cp=2), so a rank holds ``T / cp`` tokens'
worth. On top of the saved bytes comes the largest transient: the logits and their fp32 copy during the loss, or,
with activation checkpointing, the recomputed block's activations in the backward.

Model states per GPU: fp32 parameters, fp32 gradients and AdamW's two fp32 moments (16 bytes per parameter) divided
by the FSDP shard degree (``world / cp``: the parameters are sharded over the data dimension and replicated across
the context group), plus two blocks of bf16 parameters gathered for compute.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json

import torch
from common import VOCAB, commit, write_result

from tttexp.models import SIZE_PRESETS, build_model
from tttexp.training.saved_memory import saved_activation_bytes

GIB = 2**30


def saved_bytes(model: torch.nn.Module, ids: torch.Tensor, autocast: contextlib.AbstractContextManager) -> int:
    """Bytes of the distinct storages one training forward saves for the backward (parameters left out)."""

    def forward() -> torch.Tensor:
        with autocast:
            return model(ids[:, :-1], labels=ids[:, 1:], use_cache=False).loss

    return saved_activation_bytes(model, forward)


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def per_token(device: torch.device, hidden: int, heads: int, intermediate: int, seq: int, layer: str,
              checkpointing: bool, precision: str) -> dict[str, float]:
    """Saved bytes per token of one layer and of the rest (embedding, final norm, head, loss), from models of one
    and two layers at ``hidden`` width, each over ``seq`` and ``2 seq`` tokens: the difference leaves out what does
    not grow with the sequence (autocast's bf16 copies of the weights, the initial inner states)."""
    cuda = device.type == "cuda"
    autocast = _autocast(device, precision)
    ids = torch.randint(0, VOCAB, (1, 2 * seq + 1), generator=torch.Generator().manual_seed(0)).to(device)
    rates = []
    for layers in (1, 2):
        torch.manual_seed(0)
        model = build_model(vocab_size=VOCAB, hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers,
                            intermediate_size=intermediate, ttt_layer=layer, kernel="auto" if cuda else "torch",
                            gradient_checkpointing=checkpointing).to(device).train()
        short, long = saved_bytes(model, ids[:, :seq + 1], autocast), saved_bytes(model, ids, autocast)
        rates.append((long - short) / seq)
        del model
    return {"layer": rates[1] - rates[0], "rest": 2 * rates[0] - rates[1]}


def measure(device: torch.device, size: str, layer: str, seq: int, widths: list[int], precision: str) -> dict:
    """Bytes per token of a layer and of the rest, with and without activation checkpointing, at ``size``'s width:
    measured there (``widths`` empty) or at ``widths`` (same head dimension and SwiGLU ratio) and extrapolated
    linearly in the width."""
    p = SIZE_PRESETS[size]
    head_dim = p["hidden_size"] // p["num_attention_heads"]
    ratio = p["intermediate_size"] / p["hidden_size"]
    at = widths or [p["hidden_size"]]
    out: dict[str, dict[str, float]] = {}
    for checkpointing in (False, True):
        rows = [per_token(device, w, w // head_dim, round(ratio * w), seq, layer, checkpointing, precision)
                for w in at]
        key = "checkpointing" if checkpointing else "plain"
        if len(rows) == 1:
            out[key] = rows[0]
        else:  # a straight line through the two widths, at the target's
            (w0, r0), (w1, r1) = (at[0], rows[0]), (at[-1], rows[-1])
            out[key] = {k: r0[k] + (r1[k] - r0[k]) * (p["hidden_size"] - w0) / (w1 - w0) for k in r0}
    return {"measured_at_widths": at, "seq": seq, "precision": precision, **out}


def parameters(size: str, layer: str) -> tuple[int, int]:
    """(parameters of the whole model, parameters of one block), counted on the meta device."""
    with torch.device("meta"):
        model = build_model(vocab_size=VOCAB, **SIZE_PRESETS[size], ttt_layer=layer)
    block = sum(q.numel() for q in model.blocks()[0].parameters())
    return sum(q.numel() for q in model.parameters()), block


def table(rates: dict, size: str, layer: str, tokens: list[int], cp: int, world: int, act_bytes: int) -> list[dict]:
    """Per-GPU memory (GiB) of one sequence of each length at ``cp`` on ``world`` GPUs, without and with activation
    checkpointing."""
    total, block = parameters(size, layer)
    layers = SIZE_PRESETS[size]["num_hidden_layers"]
    shard = world // cp
    states = 16 * total / shard + 2 * 2 * block
    rows = []
    for length in tokens:
        local = length / cp
        logits = local * VOCAB * (act_bytes + 4)  # the logits and their fp32 copy in the loss
        for checkpointing in (False, True):
            r = rates["checkpointing" if checkpointing else "plain"]
            saved = local * (layers * r["layer"] + r["rest"])
            transient = max(logits, local * rates["plain"]["layer"]) if checkpointing else logits
            rows.append({"tokens": length, "cp": cp, "world": world, "checkpointing": checkpointing,
                         "states_gib": states / GIB, "activations_gib": (saved + transient) / GIB,
                         "total_gib": (states + saved + transient) / GIB})
    return rows


def validate(device: torch.device, size: str, layer: str, seq: int, rates: dict) -> list[dict]:
    """One real training step (forward, backward, fused AdamW) of the whole model at ``seq`` tokens on one GPU:
    its peak allocated memory against the model's estimate at cp=1, without and with checkpointing. One process
    without FSDP keeps autocast's bf16 copy of every weight (2 bytes per parameter) instead of FSDP's two blocks."""
    total, block = parameters(size, layer)
    out = []
    for checkpointing in (False, True):
        [row] = [r for r in table(rates, size, layer, [seq], 1, 1, 2) if r["checkpointing"] == checkpointing]
        estimate = row["total_gib"] + (2 * total - 2 * 2 * block) / GIB
        model = optimizer = None
        try:
            torch.manual_seed(0)
            model = build_model(vocab_size=VOCAB, **SIZE_PRESETS[size], ttt_layer=layer, kernel="auto",
                                gradient_checkpointing=checkpointing).to(device).train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
            ids = torch.randint(0, VOCAB, (1, seq + 1), device=device)
            for _ in range(2):  # the second step has the optimizer's moments allocated
                torch.cuda.reset_peak_memory_stats()
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(ids[:, :-1], labels=ids[:, 1:], use_cache=False).loss
                loss.backward()
                del loss
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            peak: float | str = torch.cuda.max_memory_allocated() / GIB
        except torch.OutOfMemoryError:
            peak = "out of memory"
        out.append({"seq": seq, "checkpointing": checkpointing, "peak_gib": peak, "estimate_gib": estimate})
        del model, optimizer
        torch.cuda.empty_cache()
    return out


def markdown(rows: list[dict], size: str, layer: str) -> str:
    lines = [f"| {size} TTT-{layer.capitalize()}, tokens | GPUs x cp | act. ckpt | weights+grads+AdamW | activations "
             "| per GPU |", "|---|---|---|---|---|---|"]
    for r in rows:
        k = r["tokens"] // 1024
        lines.append(f"| {k // 1024}M | " if k >= 1024 else f"| {k}k | ")
        lines[-1] += (f"{r['world']} x {r['cp']} | {'on' if r['checkpointing'] else 'off'} | {r['states_gib']:.1f} GiB "
                      f"| {r['activations_gib']:.1f} GiB | **{r['total_gib']:.1f} GiB** |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1.3b")
    parser.add_argument("--layer", default="linear", help="linear | mlp")
    parser.add_argument("--device", default="cuda", help="cuda: measure the size's own layers; cpu: small widths")
    parser.add_argument("--seq", type=int, default=0, help="tokens of the measuring forward (default: 8192 on a "
                        "GPU, 512 on the CPU)")
    parser.add_argument("--widths", default="", help="measure at these widths and extrapolate (CPU default 128,256)")
    parser.add_argument("--tokens", default="131072,524288,1048576", help="sequence lengths of the table")
    parser.add_argument("--cp", type=int, default=8)
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--precision", default="bf16", help="bf16 (autocast, as the GPU recipes run) | fp32")
    parser.add_argument("--validate", type=int, default=0, help="GPU: a real step of the whole model at this many "
                        "tokens, against the estimate")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    parser.add_argument("--out", default=None, help="a folder or a .json file for the result")
    args = parser.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    seq = args.seq or (8192 if cuda else 512)
    widths = [int(w) for w in args.widths.split(",") if w] or ([] if cuda else [128, 256])
    rates = measure(device, args.size, args.layer, seq, widths, args.precision)
    rows = table(rates, args.size, args.layer, [int(t) for t in args.tokens.split(",")], args.cp, args.world,
                 2 if args.precision == "bf16" else 4)
    result = {
        "benchmark": "memory_cp", "device": torch.cuda.get_device_name() if cuda else "cpu",
        "date": datetime.date.today().isoformat(), "commit": commit(), "torch": torch.__version__,
        "size": args.size, "ttt_layer": args.layer, "precision": args.precision,
        "bytes_per_token": rates, "rows": rows,
    }
    if args.validate and cuda:
        result["validation"] = validate(device, args.size, args.layer, args.validate, rates)
    print(json.dumps(result, indent=2))
    if args.markdown:
        print(markdown(rows, args.size, args.layer))
    if args.out:
        write_result(result, args.out, f"memory-cp-{args.size}")


if __name__ == "__main__":
    main()
