"""The comparison study on this machine: TTT-Linear, TTT-MLP and the Transformer++ on the same tokens.

    python benchmarks/bench_compare.py [--name compare-<date>-cpu] [override ...]

Runs ``python -m tttexp.train -m experiment=compare_tiny logging=none`` (plus any Hydra overrides given) into a
sweep directory, then keeps what the README shows under ``benchmarks/results/<name>/``: ``compare.csv``, the three
``compare_*.png`` figures, the sweep's ``summary.csv``, each job's summary, position and passkey CSVs, and
``meta.json`` (the command, commit, date, machine and wall time). Not a test: on 2 CPU cores it takes most of an
hour.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEEP = ("compare.csv", "compare_loss.png", "compare_ppl_by_position.png", "compare_passkey.png", "summary.csv",
        "multirun.yaml")
KEEP_PER_JOB = ("summary.json", "ppl_by_position.csv", "passkey.csv", "loss.png", "ppl_by_position.png",
                "passkey.png")


def commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short=8", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return out.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default=f"compare-{time.strftime('%Y-%m-%d')}-cpu")
    parser.add_argument("--sweep-dir", default=None, help="where the jobs run (default: outputs/multirun/<name>)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = parser.parse_args()
    out = ROOT / "benchmarks" / "results" / args.name
    sweep = Path(args.sweep_dir or ROOT / "outputs" / "multirun" / args.name).resolve()
    command = [sys.executable, "-m", "tttexp.train", "-m", "experiment=compare_tiny", "logging=none",
               "trainer.progress=lines", f"hydra.sweep.dir={sweep}", *args.overrides]
    print("running:", " ".join(command[1:]), flush=True)
    start = time.time()
    status = subprocess.run(command, cwd=ROOT).returncode
    wall = time.time() - start
    out.mkdir(parents=True, exist_ok=True)
    for name in KEEP:
        if (sweep / name).exists():
            shutil.copy2(sweep / name, out / name)
    for job in sorted(p for p in sweep.iterdir() if (p / ".hydra").is_dir()):
        config = (job / ".hydra" / "overrides.yaml").read_text().split()
        label = "_".join(t.split("=", 1)[1] for t in config if t.startswith(("arm=", "optim.lr=")))
        target = out / "jobs" / f"{job.name}-{label or job.name}"
        target.mkdir(parents=True, exist_ok=True)
        for name in KEEP_PER_JOB:
            if (job / name).exists():
                shutil.copy2(job / name, target / name)
    meta = {
        "command": "python -m tttexp.train -m experiment=compare_tiny logging=none " + " ".join(args.overrides),
        "exit_status": status,
        "wall_seconds": round(wall, 1),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "commit": commit(),
        "machine": f"{platform.machine()} {os.cpu_count()} cores ({platform.processor() or 'cpu'})",
        "torch_threads": os.environ.get("OMP_NUM_THREADS", "default"),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2))
    print(f"results: {out}")
    sys.exit(status)


if __name__ == "__main__":
    main()
