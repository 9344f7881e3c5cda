"""The benchmark figures that the README shows, drawn from ``benchmarks/results/*.json`` by ``run_all.py``.

- ``speed-vs-baseline.png``: each TTT model's tokens/s over the fastest baseline of the same width measured in the
  same run, against the context. A point comes from the newest run that measured it beside its baselines.
- ``step-profile-125m-2048.png``: where one compiled training step's GPU time goes, by kernel class, for every
  profile in the results (``profile_train.py``), oldest first.
"""

from __future__ import annotations

import functools
import subprocess
from collections.abc import Iterable
from pathlib import Path

# kernel classes of profile_train.py, gathered into the groups the figure shows (in stacking order)
GROUPS = {
    "TTT op": ("TTT op",),
    "attention (SDPA)": ("attention",),
    "GEMMs": ("GEMM",),
    "elementwise and fused": ("elementwise", "copies"),
    "norms": ("norms",),
    "loss": ("loss",),
    "optimizer": ("optimizer",),
    "idle": ("idle",),
}


LAYER_NAMES = {"linear": "TTT-Linear", "mlp": "TTT-MLP"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def group_of(kernel_class: str) -> str:
    """The figure's group of one of profile_train.py's kernel classes ("other" if none matches)."""
    for group, prefixes in GROUPS.items():
        if kernel_class.startswith(prefixes):
            return group
    return "other"


def speed_points(runs: Iterable[tuple[str, str, list[dict], dict]], root: Path) -> dict[tuple[str, str], dict]:
    """``runs``: (date, commit, rows, fastest baseline by (size, context)) of each training run. Returns, per (TTT
    layer, size), context -> × fastest baseline, from the newest run that rated that point (by date, then by the
    commit's time); within a run, the fastest way it ran the model (eager, compiled, per block)."""
    points: dict[tuple[str, str], dict] = {}
    for _, _, rows, best in sorted(runs, key=lambda run: (run[0], commit_time(run[1], root))):
        run_points: dict[tuple[str, str], dict] = {}
        for r in rows:
            key = (r["size"], r["context"])
            if r["model"] != "ttt" or "tokens_per_sec" not in r or key not in best:
                continue
            # the PyTorch-kernel rows and rows under other kernel settings than the defaults are not the product's
            if r.get("kernel") not in (None, "triton") or r.get("kernel_settings"):
                continue
            line = run_points.setdefault((r["ttt_layer"], r["size"]), {})
            line[r["context"]] = max(line.get(r["context"], 0.0), r["tokens_per_sec"] / best[key])
        for name, line in run_points.items():
            points.setdefault(name, {}).update(line)
    return points


def speed_figure(points: dict[tuple[str, str], dict], device: str, out: Path) -> Path | None:
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    order = {"125m": 0, "350m": 1, "760m": 2, "1.3b": 3}
    for (layer, size), line in sorted(points.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 9))):
        contexts = sorted(line)
        ax.plot(contexts, [line[c] for c in contexts], "o-" if layer == "linear" else "s--",
                label=f"{LAYER_NAMES.get(layer, layer)} {size}")
    ax.axhline(1.0, color="gray", lw=1, ls=":", label="fastest baseline of the run")
    ax.set_xscale("log", base=2)
    ticks = sorted({c for line in points.values() for c in line})
    ax.set_xticks(ticks, [f"{c // 1024}k" for c in ticks])
    ax.set_xlabel("context (tokens per sequence; 16k tokens per step)")
    ax.set_ylabel("tokens/s × fastest baseline (same run)")
    ax.set_title(f"Training speed against the fastest baseline of the same width, {device}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


@functools.cache
def commit_time(commit: str, root: Path) -> int:
    """The commit's time from git, 0 where git or the commit is missing (a copy without .git)."""
    try:
        done = subprocess.run(["git", "show", "-s", "--format=%ct", commit], cwd=root, capture_output=True,
                              text=True, timeout=10)
        return int(done.stdout.strip() or 0) if done.returncode == 0 else 0
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return 0


def profile_bars(profiles: list[dict], root: Path) -> list[tuple[str, dict[str, float]]]:
    """One bar per model of each profile, oldest profile first: (label, ms per group)."""
    bars = []
    for data in sorted(profiles, key=lambda d: (d["date"], commit_time(d["commit"], root))):
        for row in data["rows"]:
            groups: dict[str, float] = {}
            for kernel_class, ms in row["classes"].items():
                groups[group_of(kernel_class)] = groups.get(group_of(kernel_class), 0.0) + ms
            bars.append((f"{row['model']}, {data['commit'][:7]}", groups))
    return bars


def profile_figure(bars: list[tuple[str, dict[str, float]]], title: str, out: Path) -> Path | None:
    if not bars:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(bars) + 1.8))
    names = [*GROUPS, "other"]
    colours = plt.get_cmap("tab10").colors
    left = [0.0] * len(bars)
    ys = list(range(len(bars)))[::-1]  # the oldest bar on top
    for i, group in enumerate(names):
        widths = [groups.get(group, 0.0) for _, groups in bars]
        if not any(widths):
            continue
        ax.barh(ys, widths, left=left, color=colours[i % len(colours)], label=group)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    # a bar over twice the next longest is cut at the axis' end (its total still printed), so the others stay legible
    longest = sorted(left)
    limit = 1.3 * longest[-2] if len(longest) > 1 and longest[-1] > 2 * longest[-2] else 1.08 * longest[-1]
    ax.set_xlim(0, limit)
    for y, total in zip(ys, left, strict=True):
        cut = total > limit
        ax.text(min(total, limit) - (0.01 * limit if cut else -0.005 * limit), y,
                f"{total:.1f} ms" + (" (bar cut)" if cut else ""), va="center", ha="right" if cut else "left",
                fontsize=8, color="white" if cut else "black")
    ax.set_yticks(ys, [label for label, _ in bars], fontsize=8)
    ax.set_xlabel("GPU time per training step (ms; idle = no kernel running)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, ncol=4, loc="lower center", bbox_to_anchor=(0.5, 1.06))
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
