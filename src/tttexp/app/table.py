"""The end-of-run table that train and the eval harness print (imports nothing of the app, so both may use it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tttexp.loggers import catalogue as C


def print_summary(summary: dict[str, Any], run_dir: Path) -> None:
    """The end-of-run table."""
    rows = [(k.removeprefix(C.SUMMARY_PREFIX), v) for k, v in summary.items()]
    width = max((len(k) for k, _ in rows), default=10)
    print("\n" + "-" * (width + 20))
    for key, value in rows:
        text = f"{value:,.4f}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else str(value)
        print(f"{key:<{width}}  {text:>16}")
    print("-" * (width + 20))
    print(f"run directory: {run_dir}", flush=True)

