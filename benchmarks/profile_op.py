"""Per-kernel GPU time of one TTT op call (forward + backward), to see which launch the time goes to.

    python benchmarks/profile_op.py --layer linear --shapes 8x2048x12x64,1x32768x12x64
    python benchmarks/profile_op.py --layer mlp --shapes 8x2048x12x64 --config '[{}, {"hc": 16}, {"bwd_warps": 4}]'

A list of settings is timed in one run and summed up against its first entry (the baseline of that run).
"""

from __future__ import annotations

import argparse
import datetime
import json

import torch
from common import commit, op_fns, op_inputs, write_result
from torch.profiler import ProfilerActivity, profile

from tttexp.ops.dispatch import ttt_triton
from tttexp.ops.settings import LinearConfig, MLPConfig, kernel_settings


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
    ap.add_argument("--config", default="{}", help='kernel settings as JSON, e.g. \'{"chain_warps": 4}\', or a list '
                    "of them (the first is the baseline)")
    ap.add_argument("--out", default=None, help="folder or .json path for the totals")
    args = ap.parse_args()
    settings = json.loads(args.config)
    settings = settings if isinstance(settings, list) else [settings]
    default = LinearConfig() if args.layer == "linear" else MLPConfig()
    try:  # a misspelt setting fails here, before any GPU work
        configs = [kernel_settings(args.layer, entry) or default for entry in settings]
    except ValueError as err:
        ap.error(f"--config: {err}")
    totals: dict[str, list[float]] = {}
    for shape in args.shapes.split(","):
        b, t, h, f = map(int, shape.split("x"))
        for entry, config in zip(settings, configs, strict=True):
            times = kernel_times(args.layer, b, t, h, f, config)
            total = sum(times.values())
            totals.setdefault(shape, []).append(total)
            print(f"\n{args.layer} {json.dumps(entry)} B={b} T={t} H={h} F={f}: {total:.0f} us of kernels per fwd+bwd")
            for name, us in list(times.items())[:12]:
                print(f"  {us:9.1f} us  {name[:80]}")
    if len(configs) > 1:
        print(f"\n| {args.layer} settings | " + " | ".join(f"{s} us" for s in totals) + " | speed × the first |")
        print("| --- |" + " ---: |" * (len(totals) + 1))
        for i, entry in enumerate(settings):
            ratios = ", ".join(f"{row[0] / row[i]:.2f}" for row in totals.values())
            print(f"| `{json.dumps(entry)}` | " + " | ".join(f"{row[i]:.0f}" for row in totals.values())
                  + f" | {ratios} |")
    if args.out:
        result = {"benchmark": "profile-op", "device": torch.cuda.get_device_name(), "date": str(datetime.date.today()),
                  "commit": commit(), "torch": torch.__version__, "layer": args.layer, "settings": settings,
                  "us_per_fwd_bwd": totals}
        write_result(result, args.out, f"profile-op-{args.layer}")


if __name__ == "__main__":
    main()
