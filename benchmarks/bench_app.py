"""The app on a GPU, end to end: compiled vs eager gpu_optimized, wandb-offline overhead, state passing on NCCL.

    python benchmarks/bench_app.py --steps 50
Runs `python -m tttexp.train` several times on the shipped corpus (125m, bf16) and compares their metrics.jsonl:
the loss curves of compiled and eager runs (same seed and data), the median step time with logging=wandb
(offline) against logging=none, and a multi_gpu_state_passing run at world size 1 (NCCL, Triton kernels).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_app(name: str, out_dir: Path, *overrides: str) -> dict:
    run_dir = out_dir / name
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tttexp.train", *overrides, f"hydra.run.dir={run_dir}"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    (out_dir / f"{name}.log").write_text(proc.stdout + proc.stderr)
    rows = []
    if (run_dir / "metrics.jsonl").exists():
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [r for r in rows if "train/loss" in r]
    steady = [r["train/step_time_ms"] for r in train[2:]] or [float("nan")]
    result = {
        "name": name, "returncode": proc.returncode, "wall_s": wall,
        "losses": {r["step"]: r["train/loss"] for r in train},
        "median_step_ms": statistics.median(steady),
        "tokens_per_sec": statistics.median([r["train/tokens_per_sec"] for r in train[2:]] or [0.0]),
        "inference": [r for r in rows if "inference/decode_tokens_per_sec" in r][-1:],
        "state": [r.get("state/w_norm") for r in train if "state/w_norm" in r][-1:],
        "mfu": statistics.median([r.get("system/mfu", 0.0) for r in train[2:]] or [0.0]),
        "tail": (proc.stderr or proc.stdout)[-1500:] if proc.returncode else "",
    }
    print(json.dumps({k: v for k, v in result.items() if k != "losses"}), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--runs", default="eager,compiled,compiled_wandb,state_passing")
    parser.add_argument("--log-every", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    work = Path(os.environ.get("OUT", "/tmp")) / "app-runs"
    work.mkdir(parents=True, exist_ok=True)
    base = ["model=125m", "data.seq_len=2048", "data.batch_size=8", "data.vocab_size=32000", "data.val_windows=16",
            f"trainer.max_steps={args.steps}", f"trainer.log_every={args.log_every}",
            f"trainer.eval_every={args.steps}", "trainer.position_eval_sequences=2", "optim.warmup_steps=10"]
    gpu = ["strategy=gpu_optimized", "trainer.inference_every=25"]
    plans = {
        "eager": [*base, *gpu, "trainer.compile=false", "logging=none"],
        "compiled": [*base, *gpu, "trainer.compile=true", "logging=none"],
        "compiled_wandb": [*base, *gpu, "trainer.compile=true", "logging=wandb", "logging.mode=offline"],
        "state_passing": [*base, "strategy=multi_gpu_state_passing", "distributed.nproc_per_node=1", "logging=none"],
    }
    runs = {name: run_app(name, work, *plans[name]) for name in args.runs.split(",")}
    empty = {"losses": {}, "median_step_ms": float("nan")}
    eager, compiled = runs.get("eager", empty)["losses"], runs.get("compiled", empty)["losses"]
    common = sorted(set(eager) & set(compiled))
    diffs = [abs(eager[s] - compiled[s]) for s in common]
    summary = {
        "benchmark": "app",
        "device": _device(),
        "date": datetime.date.today().isoformat(),
        "commit": os.environ.get("GIT_COMMIT", "unknown"),
        "steps": args.steps,
        "compiled_vs_eager_max_abs_loss_diff": max(diffs) if diffs else None,
        "compiled_vs_eager_loss_first_last": [eager.get(common[0]), eager.get(common[-1]), compiled.get(common[-1])]
        if common else None,
        "compiled_speedup": runs.get("eager", empty)["median_step_ms"] / runs.get("compiled", empty)["median_step_ms"],
        "wandb_offline_overhead": runs.get("compiled_wandb", empty)["median_step_ms"]
        / runs.get("compiled", empty)["median_step_ms"] - 1,
        "runs": runs,
    }
    device = summary["device"].replace(" ", "_")
    out = Path(args.out or ROOT / f"benchmarks/results/app-{summary['date']}-{device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(f"{'run':<16}{'rc':>4}{'step ms':>10}{'tok/s':>10}{'mfu':>7}{'final loss':>12}")
    for name, r in runs.items():
        last = r["losses"][max(r["losses"])] if r["losses"] else float("nan")
        print(f"{name:<16}{r['returncode']:>4}{r['median_step_ms']:>10.1f}{r['tokens_per_sec']:>10,.0f}"
              f"{r['mfu']:>7.2f}{last:>12.4f}")
    print(f"compiled vs eager: max |loss diff| {summary['compiled_vs_eager_max_abs_loss_diff']}, "
          f"speed-up x{summary['compiled_speedup']:.2f}; wandb offline overhead "
          f"{100 * summary['wandb_offline_overhead']:+.1f}%")


def _device() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    main()
