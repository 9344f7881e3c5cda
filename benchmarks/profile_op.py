"""Per-kernel GPU time of one TTT op call (forward + backward), to see which launch the time goes to.

    python benchmarks/profile_op.py --layer linear --shapes 8x2048x12x64,1x32768x12x64
"""

from __future__ import annotations

import argparse
import json

import torch
from common import op_fns, op_inputs
from torch.profiler import ProfilerActivity, profile

from tttexp.ops.dispatch import ttt_triton
from tttexp.ops.ttt_linear.triton import LinearConfig
from tttexp.ops.ttt_mlp.triton import MLPConfig


def kernel_times(layer: str, b: int, t: int, h: int, f: int, config, reps: int = 5) -> dict[str, float]:
    """Mean microseconds per call of every GPU kernel that one forward+backward launches."""
    inputs = op_inputs(layer, b, t, h, f, torch.bfloat16)
    _, fwd_bwd, leaves = op_fns(ttt_triton, layer, inputs, config=config)
    for _ in range(3):
        fwd_bwd()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fwd_bwd()
        torch.cuda.synchronize()
    times = {e.key: e.device_time_total / reps for e in prof.key_averages() if e.device_time_total > 0}
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer", default="linear")
    ap.add_argument("--shapes", default="8x2048x12x64,1x32768x12x64", help="BxTxHxF, comma separated")
    ap.add_argument("--config", default="{}", help='kernel settings as JSON, e.g. \'{"chain_warps": 4}\'')
    args = ap.parse_args()
    config = (LinearConfig if args.layer == "linear" else MLPConfig)(**json.loads(args.config))
    for shape in args.shapes.split(","):
        b, t, h, f = map(int, shape.split("x"))
        times = kernel_times(args.layer, b, t, h, f, config)
        total = sum(times.values())
        print(f"\n{args.layer} {args.config} B={b} T={t} H={h} F={f}: {total:.0f} us of kernels per fwd+bwd")
        for name, us in list(times.items())[:12]:
            print(f"  {us:9.1f} us  {name[:80]}")


if __name__ == "__main__":
    main()
