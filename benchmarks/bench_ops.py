"""Time the Triton TTT op against the PyTorch reference op (``reference.ttt_dual``) on one GPU.

    PYTHONPATH=src python benchmarks/bench_ops.py [--quick] [--variants] [--out DIR]

Medians from ``triton.testing.do_bench`` (CUDA events) of forward and forward+backward, bf16 inputs, on fresh random
data; the reference is timed in the same run on the same inputs, and every figure is also given as a ratio to it.
Writes ``ops-<date>-<device>.json`` (device, date, commit from ``GIT_COMMIT`` or ``git rev-parse HEAD``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import platform
import time
from pathlib import Path

import torch
import triton
from common import commit, op_fns, op_inputs, times_ms
from triton.testing import do_bench

from tttexp.ops import reference
from tttexp.ops.dispatch import ttt_triton
from tttexp.ops.ttt_linear.decode import linear_decode_step
from tttexp.ops.ttt_linear.triton import LinearConfig
from tttexp.ops.ttt_mlp.triton import MLPConfig


def time_ms(fn, leaves, rep: int = 200) -> float:
    return float(do_bench(fn, warmup=25, rep=rep, grad_to_none=leaves, return_mode="median"))


def time_once_ms(fn, n: int = 2) -> float:
    """For slow baselines: the median of ``n`` event-timed runs after one warm-up."""
    fn()
    torch.cuda.synchronize()
    times = times_ms(fn, n, cuda=True)
    return float(sorted(times)[len(times) // 2])


def graph_ms(fn, leaves) -> float:
    """GPU time of ``fn`` (forward and backward) replayed from a CUDA graph: no host launch cost."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    for x in leaves:
        x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return float(do_bench(graph.replay, warmup=25, rep=200, return_mode="median"))


def bench_case(layer: str, b: int, t: int, h: int, f: int, dtype: torch.dtype, ref: str) -> dict:
    inputs = op_inputs(layer, b, t, h, f, dtype)
    tf, tfb, leaves = op_fns(ttt_triton, layer, inputs)
    row = {"layer": layer, "B": b, "T": t, "H": h, "F": f, "dtype": str(dtype).removeprefix("torch."),
           "triton_fwd_ms": time_ms(tf, leaves), "triton_fwd_bwd_ms": time_ms(tfb, leaves),
           "triton_fwd_bwd_graph_ms": graph_ms(tfb, leaves)}
    if ref != "skip":
        rf, rfb, _ = op_fns(reference.ttt_dual, layer, inputs)
        timer = (lambda fn: time_ms(fn, leaves, rep=500)) if ref == "bench" else time_once_ms
        row["ref_fwd_ms"] = timer(rf)
        row["ref_fwd_bwd_ms"] = timer(rfb)
        row["speedup_fwd"] = row["ref_fwd_ms"] / row["triton_fwd_ms"]
        row["speedup_fwd_bwd"] = row["ref_fwd_bwd_ms"] / row["triton_fwd_bwd_ms"]
    return row


GRID_LINEAR_64 = [{}, {"every": 16}, {"fwd_stages": 2, "bwd_stages": 2}, {"bwd_warps": 4}]
GRID_LINEAR_96 = [{}, {"bwd_stages": 1}]
GRID_MLP_64 = [{}, {"hc": 16}, {"warps": 4, "bwd_warps": 4}, {"fwd_stages": 1, "bwd_stages": 1}]


def variants(layer: str, b: int, t: int, h: int, f: int, grid: list[dict]) -> list[dict]:
    """fwd / fwd+bwd of one layer's op under kernel settings (checkpoint interval, warps, stages, chunk)."""
    cls = LinearConfig if layer == "linear" else MLPConfig
    rows = []
    inputs = op_inputs(layer, b, t, h, f, torch.bfloat16)
    for change in grid:
        tf, tfb, leaves = op_fns(ttt_triton, layer, inputs, config=cls(**change))
        rows.append({"layer": layer, "shape": [b, t, h, f], "change": change or "default",
                     "fwd_ms": time_ms(tf, leaves), "fwd_bwd_ms": time_ms(tfb, leaves)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_decode(b: int, h: int, f: int) -> dict:
    """One TTT-Linear decode step (one token per row and head), bf16 activations, fp32 state."""
    dev = "cuda"
    x = [torch.randn(b, h, 1, f, device=dev).to(torch.bfloat16) for _ in range(3)]
    lr = torch.rand(b, h, 1, device=dev) / f
    tok = torch.rand(1, device=dev)
    ln_w, ln_b = torch.ones(h, f, device=dev), torch.zeros(h, f, device=dev)
    state = (0.02 * torch.randn(b, h, f, f, device=dev), torch.zeros(b, h, f, device=dev))
    acc = (0.01 * torch.randn(b, h, f, f, device=dev), 0.01 * torch.randn(b, h, f, device=dev))
    ms = time_ms(lambda: linear_decode_step(*x, lr, tok, ln_w, ln_b, state, acc), None)
    return {"B": b, "H": h, "F": f, "decode_step_us": 1000.0 * ms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only the 125m shape")
    ap.add_argument("--variants", action="store_true", help="also sweep kernel settings (F=64 and F=96)")
    ap.add_argument("--out", default="benchmarks/results", help="folder for the JSON result")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    cases = [("linear", 8, 2048, 12, 64, "bench")]
    if not args.quick:
        cases += [("linear", 1, 32768, 12, 64, "once"), ("linear", 4, 2048, 16, 96, "once"),
                  ("mlp", 8, 2048, 12, 64, "once"), ("mlp", 1, 32768, 12, 64, "skip")]
    t0 = time.time()
    rows = []
    for layer, b, t, h, f, ref in cases:
        rows.append(bench_case(layer, b, t, h, f, torch.bfloat16, ref))
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "device": torch.cuda.get_device_name(), "date": dt.date.today().isoformat(), "commit": commit(),
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "config": {"linear": dataclasses.asdict(LinearConfig()), "mlp": dataclasses.asdict(MLPConfig())},
        "method": "triton.testing.do_bench median (ms); reference ttt_dual same inputs",
        "cases": rows,
    }
    result["decode"] = [bench_decode(8, 12, 64), bench_decode(1, 12, 64)]
    if args.variants:
        result["variants"] = (variants("linear", 8, 2048, 12, 64, GRID_LINEAR_64)
                              + variants("linear", 4, 2048, 16, 96, GRID_LINEAR_96)
                              + variants("mlp", 8, 2048, 12, 64, GRID_MLP_64))
    result["wall_s"] = time.time() - t0
    dev = torch.cuda.get_device_name().replace(" ", "-").lower()
    out = Path(args.out) / f"ops-{result['date']}-{dev}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    head = ["layer", "B", "T", "H", "F", "fwd ms", "fwd+bwd ms", "graph", "ref fwd+bwd", "x"]
    print("\n" + " ".join(f"{c:>{w}}" for c, w in zip(head, [7, 2, 6, 3, 3, 8, 10, 7, 11, 6], strict=True)))
    for r in rows:
        print(f"{r['layer']:7} {r['B']:>2} {r['T']:>6} {r['H']:>3} {r['F']:>3} {r['triton_fwd_ms']:8.3f} "
              f"{r['triton_fwd_bwd_ms']:10.3f} {r['triton_fwd_bwd_graph_ms']:7.3f} "
              f"{r.get('ref_fwd_bwd_ms', float('nan')):11.2f} "
              f"{r.get('speedup_fwd_bwd', float('nan')):6.1f}")
    for r in result["decode"]:
        print(f"decode B={r['B']} H={r['H']} F={r['F']}: {r['decode_step_us']:.1f} us/token step")
    for r in result.get("variants", []):
        print(f"  {r['layer']:6} F={r['shape'][3]} {str(r['change']):38} fwd {r['fwd_ms']:.3f}  "
              f"fwd+bwd {r['fwd_bwd_ms']:.3f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
