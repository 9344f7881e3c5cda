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
import sys
import tempfile
from pathlib import Path

import torch
from bench_app import ROOT, run_app


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run = run_app("default", Path(tmp))
        if run["returncode"] != 0:
            sys.exit(f"the default run failed (exit {run['returncode']}):\n{run['tail']}")
        summary = json.loads((Path(tmp) / "default" / "summary.json").read_text())
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {
        "benchmark": "default_run", "date": datetime.date.today().isoformat(), "device": device,
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "wall_s": run["wall_s"],
        "final_val_loss": summary.get("summary/final_val_loss"), "train_s": summary.get("summary/total_time"),
    }
    out = ROOT / "benchmarks" / "results" / f"default-{result['date']}-{'gpu' if device != 'cpu' else 'cpu'}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
