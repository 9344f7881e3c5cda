"""PNG plots of a run, drawn without a display: loss curves and perplexity by position."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def read_metrics(path: Path) -> list[dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash
    return rows


def plot_losses(metrics_path: Path, out: Path) -> Path | None:
    """Train and validation loss against the step (the last record of each step wins, so resumes overwrite)."""
    train, val = {}, {}
    for row in read_metrics(metrics_path):
        if "train/loss" in row:
            train[row["step"]] = row["train/loss"]
        if "val/loss" in row:
            val[row["step"]] = row["val/loss"]
    if not train and not val:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(sorted(train), [train[s] for s in sorted(train)], label="train/loss")
    if val:
        ax.plot(sorted(val), [val[s] for s in sorted(val)], "o-", label="val/loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_by_position(rows: Sequence[dict], out: Path, title: str = "") -> Path | None:
    """Validation perplexity against the token position (bucket midpoints)."""
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    mids = [(r["start"] + r["end"]) / 2 for r in rows]
    ax.plot(mids, [r["ppl"] for r in rows], "o-")
    ax.set_xlabel("token position")
    ax.set_ylabel("perplexity")
    ax.set_title(title or "validation perplexity by position")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
