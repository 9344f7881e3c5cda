"""Where a training step's GPU time goes, by kernel class, for a TTT model beside the Llama and the Transformer++ arm.

    python benchmarks/profile_train.py --size 125m --context 2048 --layer linear
    python benchmarks/profile_train.py --size 125m --context 2048 --layer mlp --models ttt,attention,llama

Each model runs full optimizer steps (bf16 autocast, fused AdamW) as `bench_train.py` times them, compiled whole
unless ``--eager``. After warm-up the step is timed with CUDA events (median), then ``--steps`` steps run under the
torch profiler. Every GPU kernel is tied to the operator that launched it and sorted into one class:

- the TTT op, forward and backward (the ``tttexp::`` custom ops);
- GEMMs by what they multiply, told apart by their shapes (``width x width``: the q/k/v/o/gate projections;
  ``width x intermediate``: the SwiGLU MLP; ``width x vocab``: the LM head; ``width x heads``: TTT's learning-rate
  gate), forward and backward;
- softmax attention (the SDPA kernels);
- Inductor's fused kernels: norms, the loss, and the rest (elementwise: convs, RoPE, gates, residuals);
- the optimizer, copies and fills, and the idle gap (step time minus the time some kernel ran).

It prints one table, milliseconds per step, a column per model, and writes it as JSON and Markdown to ``--out``
(default ``benchmarks/results/profile-<size>-<context>-<layer>-<date>-<device>.{json,md}``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from common import VOCAB, arm, commit, llama, times_ms, ttt
from torch.profiler import ProfilerActivity, profile

from tttexp.models import SIZE_PRESETS

_GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation", "aten::matmul",
             "aten::linear", "aten::_scaled_mm"}
_GEMM_KERNEL = re.compile(r"gemm|xmma|cutlass|nvjet|cublas|sm90_|sm80_|ampere_|s16816|wgmma", re.IGNORECASE)
_ATTENTION = re.compile(r"scaled_dot_product|flash|fmha|efficient_attention|cudnn.*attention", re.IGNORECASE)
_LOSS = re.compile(r"log_softmax|nll_loss|cross_entropy|logsumexp", re.IGNORECASE)
_NORM = re.compile(r"layer_norm|rsqrt|var_mean|rms_norm", re.IGNORECASE)
_COPY = re.compile(r"^memcpy|^memset|copy_kernel|fill_kernel|Memcpy|Memset", re.IGNORECASE)
_OPTIMIZER = re.compile(r"optimizer\.step|adam", re.IGNORECASE)
_BACKWARD = re.compile(r"backward|autograd::engine", re.IGNORECASE)


@dataclass
class Launch:
    """One GPU kernel (or, on the CPU, one leaf operator): its name, the operators above it, their shapes."""

    kernel: str
    chain: tuple[str, ...]  # innermost operator first
    shapes: list
    us: float

    def shape_of(self, index: int) -> list:
        """The input shapes of the operator at ``index`` in the chain."""
        return self.shapes[index] if index < len(self.shapes) else []


def gemm_role(shapes: list, dims: dict[str, int]) -> str:
    """What a GEMM multiplies, from its operand shapes: the two sizes that are not the token count."""
    sizes = [s for s in shapes if isinstance(s, list | tuple) and len(s) >= 2][:2]
    if len(sizes) < 2:
        return "other"
    tokens = dims["tokens"]
    found = {d for shape in sizes for d in shape[-2:] if d != tokens}
    w, inter, vocab, heads = dims["width"], dims["intermediate"], dims["vocab"], dims["heads"]
    if vocab in found:
        return "LM head (width x vocab)"
    if inter in found:
        return "MLP (width x intermediate)"
    if heads in found and found <= {w, heads}:
        return "TTT lr gate (width x heads)"
    # the TTT layer's input projections as one GEMM: width x (m * width [+ heads])
    if found and all(d == w or (d > w and (d % w == 0 or (d - heads) % w == 0)) for d in found):
        return "projections (width x width: q/k/v/o/gate; TTT's fused in one GEMM)"
    return "other"


def classify(launch: Launch, dims: dict[str, int]) -> str:
    """The class of one kernel, e.g. ``GEMM fwd: MLP (width x intermediate)``."""
    ops = " / ".join(launch.chain)
    everything = f"{launch.kernel} / {ops}"
    direction = "bwd" if _BACKWARD.search(ops) else "fwd"
    if "tttexp::" in ops:
        return "TTT op bwd" if re.search(r"tttexp::\w*bwd", ops) else "TTT op fwd"
    if _OPTIMIZER.search(everything):
        return "optimizer"
    gemm_op = next((i for i, name in enumerate(launch.chain) if name in _GEMM_OPS), None)
    if _ATTENTION.search(everything):
        return f"attention (SDPA) {direction}"
    if gemm_op is not None or _GEMM_KERNEL.search(launch.kernel):
        shapes = launch.shapes if gemm_op is None else launch.shape_of(gemm_op)
        return f"GEMM {direction}: {gemm_role(shapes, dims)}"
    if _COPY.search(launch.kernel):
        return "copies and fills"
    if _LOSS.search(everything):
        return "loss (cross-entropy)"
    if _NORM.search(launch.kernel):
        return f"norms {direction}"
    return f"elementwise and other fused {direction}"


def launches(prof, device: str) -> Iterable[Launch]:
    """Every kernel of the profile with the chain of operators that launched it (on the CPU: every leaf operator,
    its own time, so the classes can be checked without a GPU)."""
    events = prof.events()
    for event in events:
        if event.device_type != torch.autograd.DeviceType.CPU:
            continue
        chain, shapes, node = [], [], event
        while node is not None:
            chain.append(node.name)
            shapes.append(list(node.input_shapes or []))
            node = node.cpu_parent
        if device == "cuda":
            for kernel in event.kernels:
                yield Launch(kernel.name, tuple(chain), shapes, kernel.duration)
        elif not event.cpu_children:
            yield Launch(event.name, tuple(chain), shapes, event.self_cpu_time_total)


def step_fn(model, call, opt, ids, device: str):
    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16):
            out = call(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def profile_model(name: str, model, batch: int, ctx: int, dims: dict[str, int], args) -> dict:
    """Median step time and the per-class GPU time of one model, in milliseconds per step."""
    device = args.device
    torch.manual_seed(0)
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    call = model if args.eager else torch.compile(model)
    ids = torch.randint(0, VOCAB, (batch, ctx), device=device)
    step = step_fn(model, call, opt, ids, device)
    for _ in range(args.warmup):
        step()
    times = times_ms(step, args.timed, cuda=device == "cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(args.steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
    by_class: dict[str, float] = defaultdict(float)
    kernels: dict[tuple[str, str], float] = defaultdict(float)
    for launch in launches(prof, device):
        kind = classify(launch, dims)
        by_class[kind] += launch.us / 1000 / args.steps
        kernels[(kind, launch.kernel)] += launch.us / 1000 / args.steps
    step_ms = statistics.median(times)
    busy = sum(by_class.values())
    by_class["idle (no kernel running)"] = max(0.0, step_ms - busy)
    every = [{"class": kind, "kernel": name, "ms": ms}
             for (kind, name), ms in sorted(kernels.items(), key=lambda kv: -kv[1])]
    print(f"{name}: step {step_ms:.2f} ms, kernels {busy:.2f} ms, {batch * ctx / step_ms * 1000:,.0f} tokens/s",
          flush=True)
    return {"model": name, "step_ms": step_ms, "kernel_ms": busy, "tokens_per_sec": batch * ctx / step_ms * 1000,
            "classes": dict(sorted(by_class.items())), "kernels": every}


def build(name: str, size: str, layer: str):
    if name == "ttt":
        return ttt(size, layer, False, "triton" if torch.cuda.is_available() else "torch")
    if name == "attention":
        return arm(size)
    if name == "llama":
        return llama(size)
    raise SystemExit(f"--models takes ttt, attention and llama, got {name!r}")


def table(rows: list[dict]) -> str:
    """Markdown: a row per class, a column per model, ms per step; the step and tokens/s last."""
    classes = sorted({c for r in rows for c in r["classes"]}, key=lambda c: (c.startswith("idle"), c))
    head = "| class (ms per step) | " + " | ".join(r["model"] for r in rows) + " |"
    lines = [head, "| --- |" + " ---: |" * len(rows)]
    for c in classes:
        lines.append(f"| {c} | " + " | ".join(f"{r['classes'].get(c, 0.0):.2f}" for r in rows) + " |")
    steps = " | ".join(f"**{r['step_ms']:.2f}**" for r in rows)
    lines.append(f"| **step (median; CUDA events on a GPU)** | {steps} |")
    lines.append("| tokens/s | " + " | ".join(f"{r['tokens_per_sec']:,.0f}" for r in rows) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="125m", choices=list(SIZE_PRESETS))
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per step (batch = tokens / context)")
    ap.add_argument("--layer", default="linear", choices=["linear", "mlp"], help="the TTT model's inner layer")
    ap.add_argument("--models", default="ttt,attention,llama", help="ttt (the --layer model), attention "
                    "(the project's Transformer++ arm), llama (transformers' Llama of the same width)")
    ap.add_argument("--eager", action="store_true", help="no torch.compile")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--timed", type=int, default=8, help="steps timed with CUDA events")
    ap.add_argument("--steps", type=int, default=3, help="steps under the profiler")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="path stem for the .json and .md files")
    args = ap.parse_args()

    preset = SIZE_PRESETS[args.size]
    batch = max(1, args.tokens // args.context)
    dims = {"tokens": batch * args.context, "width": preset["hidden_size"], "heads": preset["num_attention_heads"],
            "intermediate": preset["intermediate_size"], "vocab": VOCAB}
    rows = []
    for name in args.models.split(","):
        label = f"TTT-{args.layer}" if name == "ttt" else {"attention": "Transformer++ arm", "llama": "Llama"}[name]
        rows.append(profile_model(label, build(name, args.size, args.layer), batch, args.context, dims, args))
        torch.cuda.empty_cache() if args.device == "cuda" else None
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    date = datetime.date.today().isoformat()
    mode = "eager" if args.eager else "compiled"
    title = (f"Step time by kernel class, {args.size}, {batch}x{args.context}, {mode}, bf16, {device}, {date}, "
             f"commit {commit()[:8]} (`benchmarks/profile_train.py`)")
    text = f"{title}\n\n{table(rows)}\n"
    print(text)
    stem = Path(args.out or f"benchmarks/results/profile-{args.size}-{args.context}-{args.layer}-{date}-"
                            f"{device.replace(' ', '_').lower()}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps(
        {"benchmark": "profile_train", "device": device, "date": date, "commit": commit(), "torch": torch.__version__,
         "size": args.size, "context": args.context, "batch": batch, "compiled": not args.eager, "rows": rows},
        indent=2))


if __name__ == "__main__":
    main()
