"""PNG plots of a run, drawn without a display: loss curves and perplexity by position."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tttexp.loggers import catalogue as C
from tttexp.loggers.jsonl import read_metrics


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_losses(metrics_path: Path, out: Path) -> Path | None:
    """Train and validation loss against the step (the last record of each step wins, so resumes overwrite)."""
    train, val = {}, {}
    for row in read_metrics(metrics_path):
        if C.TRAIN_LOSS in row:
            train[row["step"]] = row[C.TRAIN_LOSS]
        if C.VAL_LOSS in row:
            val[row["step"]] = row[C.VAL_LOSS]
    if not train and not val:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(sorted(train), [train[s] for s in sorted(train)], label=C.TRAIN_LOSS)
    if val:
        ax.plot(sorted(val), [val[s] for s in sorted(val)], "o-", label=C.VAL_LOSS)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_by_position(rows: Sequence[dict], out: Path, title: str = "", train_len: int | None = None) -> Path | None:
    """Validation perplexity against the token position (bucket midpoints); a dashed line at the training length."""
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    mids = [(r["start"] + r["end"]) / 2 for r in rows]
    ax.plot(mids, [r["ppl"] for r in rows], "o-")
    if train_len:
        ax.axvline(train_len, color="gray", ls="--", lw=1, label=f"training length ({train_len})")
        ax.legend()
    ax.set_xlabel("token position")
    ax.set_ylabel("perplexity")
    ax.set_title(title or "validation perplexity by position", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _heatmap(ax, rows: Sequence[dict], title: str, ylabel: bool = True):
    lengths = sorted({int(r["length"]) for r in rows})
    depths = sorted({float(r["depth"]) for r in rows})
    grid = [[float("nan")] * len(lengths) for _ in depths]
    for r in rows:
        grid[depths.index(float(r["depth"]))][lengths.index(int(r["length"]))] = 100.0 * r["accuracy"]
    image = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto", origin="upper")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, "-" if value != value else f"{value:.0f}", ha="center", va="center", fontsize=8)
    ax.set_xlabel("context length (tokens)")
    if ylabel:
        ax.set_ylabel("needle depth (0 = start)")
    ax.set_title(title, fontsize=10)
    return image


def plot_passkey(rows: Sequence[dict], out: Path, title: str = "") -> Path | None:
    """Passkey accuracy (%) as a heatmap: context length across, needle depth down."""
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    image = _heatmap(ax, rows, title or "passkey retrieval accuracy (%)")
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------------------------------------------
# The comparison study: one line (or panel) per arm
# --------------------------------------------------------------------------------------------------------------


def plot_compare_loss(curves: dict[str, tuple[list[float], list[float]]], out: Path, title: str) -> Path | None:
    """Validation loss against training tokens, one line per arm (``curves[arm] = (tokens, losses)``)."""
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for arm, (tokens, losses) in curves.items():
        ax.plot(tokens, losses, "o-", ms=3, label=arm)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(title="arm (best LR)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_compare_by_position(curves: dict[str, Sequence[dict]], out: Path, title: str,
                             train_len: int | None = None) -> Path | None:
    """Perplexity by position, one line per arm; a dashed line at the training length."""
    curves = {arm: rows for arm, rows in curves.items() if rows}
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for arm, rows in curves.items():
        ax.plot([(r["start"] + r["end"]) / 2 for r in rows], [r["ppl"] for r in rows], "o-", ms=3, label=arm)
    if train_len:
        ax.axvline(train_len, color="gray", ls="--", lw=1, label=f"training length ({train_len})")
    ax.set_xlabel("token position in a held-out document")
    ax.set_ylabel("perplexity")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_compare_passkey(tables: dict[str, Sequence[dict]], out: Path, title: str) -> Path | None:
    """One passkey heatmap per arm, side by side, on one colour scale."""
    tables = {arm: rows for arm, rows in tables.items() if rows}
    if not tables:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(tables), figsize=(4.2 * len(tables) + 1.0, 4.2), squeeze=False)
    image = None
    for i, (ax, (arm, rows)) in enumerate(zip(axes[0], tables.items(), strict=True)):
        image = _heatmap(ax, rows, arm, ylabel=i == 0)
    fig.suptitle(title, fontsize=11)
    fig.colorbar(image, ax=list(axes[0]), label="accuracy (%)")
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out
