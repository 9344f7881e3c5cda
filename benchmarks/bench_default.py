"""Wall time of the README's first command, the embedded default run, on this machine (meant for a CPU machine).

    python benchmarks/bench_default.py
Runs `python -m tttexp.train` with no overrides in a fresh run directory and writes
`results/default-<date>-<cpu|gpu>.json`: wall seconds from process start to exit, CPU count, device, final
validation loss.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "tttexp.train", f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env,
                              capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"the default run failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {
        "benchmark": "default_run", "date": datetime.date.today().isoformat(), "device": device,
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "wall_s": wall,
        "final_val_loss": summary.get("summary/final_val_loss"), "train_s": summary.get("summary/total_time"),
    }
    out = ROOT / "benchmarks" / "results" / f"default-{result['date']}-{'gpu' if device != 'cpu' else 'cpu'}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
