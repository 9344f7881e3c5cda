"""The comparison study: arms x learning rates on the same tokens -> ``compare.csv`` and overlaid figures.

``python -m tttexp.train -m experiment=compare`` (``compare_tiny`` on a CPU) sweeps ``arm`` (``conf/arm/*.yaml``: a
named set of model overrides) against a small ``optim.lr`` grid. :class:`StudyReport` is the Hydra callback that

* before any job starts, refuses a study whose arms would see different data: a swept key that changes the data,
  the token budget or the schedule's shape, or an arm file that sets anything but ``model.*``, is named in one
  line and the sweep exits with status 2;
* at the end, picks each arm's best learning rate by final validation loss and writes ``compare.csv`` (one row
  per arm), ``compare_loss.png``, ``compare_ppl_by_position.png`` and ``compare_passkey.png`` into the sweep
  directory. Every job records a hash of the training tokens it consumed (``summary/data_hash``); the CSV says
  whether all jobs share it.

``python -m tttexp.app.study <sweep_dir>`` writes the same files again from a finished sweep directory.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from tttexp.app.sweep_summary import job_dirs
from tttexp.loggers import catalogue as C

log = logging.getLogger(__name__)
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
COMPARE_CSV = "compare.csv"

# Swept keys that change what a job trains on, how much, or the shape of its schedule: never varied in a study.
UNFAIR_KEYS = ("seed", "data.", "trainer.max_steps", "trainer.grad_accum_steps", "distributed.", "strategy",
               "experiment", "optim.warmup_steps", "optim.min_lr_ratio", "hparams_search", "resume")
ARM_MAY_SET = ("model", "study")  # the top-level sections an arm file may set

COLUMNS = ("arm", "best_lr", "lr_grid", "parameters", "tokens", "train_flops", "final_train_loss", "val_loss",
           "val_ppl", "ppl_within_train", "ppl_late", "late_positions", "passkey_accuracy", "tokens_per_sec",
           "same_data", "jobs")


# --------------------------------------------------------------------------------------------------------------
# Fairness before the sweep starts
# --------------------------------------------------------------------------------------------------------------


def swept(config: DictConfig) -> dict[str, list[str]]:
    """The keys a multirun varies (the sweeper's ``params`` and command-line sweeps) and their values."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    texts = [f"{k}={v}" for k, v in (OmegaConf.select(config, "hydra.sweeper.params") or {}).items()]
    texts += [str(t) for t in (OmegaConf.select(config, "hydra.overrides.task") or [])]
    out: dict[str, list[str]] = {}
    for ov in OverridesParser.create().parse_overrides(texts):
        if ov.is_sweep_override():
            key = ov.get_key_element().lstrip("+~")
            out[key] = [str(v) for v in ov.sweep_string_iterator()]
        else:
            out.pop(ov.get_key_element().lstrip("+~"), None)  # a plain command-line value replaces a sweep
    return out


def _flat(node: Any, prefix: str = "") -> Iterable[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "defaults":
                continue
            yield from _flat(value, f"{prefix}{key}.")
    else:
        yield prefix.rstrip(".")


def arm_problem(arm: str, conf_dir: Path = CONF_DIR) -> str | None:
    """Why an arm file would change the data (it sets a key outside ``model.*`` / ``study.*``), or None."""
    path = conf_dir / "arm" / f"{arm}.yaml"
    if not path.is_file():
        options = ", ".join(sorted(p.stem for p in (conf_dir / "arm").glob("*.yaml")))
        return f"arm={arm} is not an option; choose from: {options}"
    body = yaml.safe_load(path.read_text()) or {}
    for key in _flat(body):
        if key.split(".")[0] not in ARM_MAY_SET:
            return (f"arm {arm} sets {key}: arms must see the same data, budget and schedule, so an arm may set "
                    f"only model.* keys (put shared settings in the experiment file)")
    return None


def fairness_problem(config: DictConfig, conf_dir: Path = CONF_DIR) -> str | None:
    """The one-line reason this study's jobs would not see the same data, or None."""
    varied = swept(config)
    for key, values in varied.items():
        if key.startswith(UNFAIR_KEYS) and len(set(values)) > 1:
            return (f"study refused: {key} varies across jobs ({','.join(values)}), so the arms would see different "
                    f"data, budgets or schedules; a study varies only arm, optim.lr and model.* keys")
    arms = varied.get("arm") or ([str(a)] if (a := OmegaConf.select(config, "study.arm")) else [])
    for arm in arms:
        problem = arm_problem(arm, conf_dir)
        if problem:
            return f"study refused: {problem}"
    return None


# --------------------------------------------------------------------------------------------------------------
# Reading a finished sweep
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Job:
    path: Path
    arm: str
    lr: float
    summary: dict[str, Any]
    facts: dict[str, Any] = field(default_factory=dict)
    val_curve: list[tuple[float, float]] = field(default_factory=list)  # (tokens, val loss)
    train_tps: list[float] = field(default_factory=list)
    seq_len: int = 0

    @property
    def ok(self) -> bool:
        return _finite(self.summary.get(C.SUMMARY_FINAL_VAL_LOSS))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def read_job(path: Path) -> Job | None:
    cfg_path = path / ".hydra" / "config.yaml"
    if not cfg_path.is_file():
        return None
    cfg = yaml.safe_load(cfg_path.read_text()) or {}
    arm = (cfg.get("study") or {}).get("arm") or _arm_label(cfg.get("model") or {})
    summary = _json(path / "summary.json") or {}
    job = Job(path=path, arm=str(arm), lr=float((cfg.get("optim") or {}).get("lr", float("nan"))),
              summary=summary, seq_len=int((cfg.get("data") or {}).get("seq_len") or 0))
    steps, tokens = summary.get(C.SUMMARY_STEPS), summary.get(C.SUMMARY_TOKENS_SEEN)
    per_step = tokens / steps if _finite(steps) and steps and _finite(tokens) else 0.0
    metrics = path / "metrics.jsonl"
    if metrics.is_file():
        curve: dict[int, float] = {}
        for line in metrics.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if row.get("_type") == "start":
                job.facts = row.get("facts") or {}
            elif C.VAL_LOSS in row:
                curve[int(row["step"])] = float(row[C.VAL_LOSS])
            if C.TRAIN_TOKENS_PER_SEC in row:
                job.train_tps.append(float(row[C.TRAIN_TOKENS_PER_SEC]))
        job.val_curve = [(step * per_step, loss) for step, loss in sorted(curve.items())]
    return job


def _arm_label(model: dict) -> str:
    if model.get("mixer_types"):
        return "hybrid:" + ",".join(model["mixer_types"])
    return "transformer" if model.get("mixer") == "attention" else f"ttt_{model.get('ttt_layer', 'linear')}"


def _json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _csv_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with path.open() as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


# --------------------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------------------


def best_jobs(jobs: list[Job]) -> dict[str, tuple[Job | None, list[Job]]]:
    """Per arm (in order of first appearance): the job with the lowest final validation loss, and all its jobs."""
    arms: dict[str, list[Job]] = {}
    for job in jobs:
        arms.setdefault(job.arm, []).append(job)
    out = {}
    for arm, members in arms.items():
        ok = [j for j in members if j.ok]
        out[arm] = (min(ok, key=lambda j: j.summary[C.SUMMARY_FINAL_VAL_LOSS]) if ok else None, members)
    return out


def _median(values: list[float]) -> float | None:
    values = sorted(v for v in values if _finite(v))
    return values[len(values) // 2] if values else None


def compare_rows(jobs: list[Job]) -> list[dict[str, Any]]:
    hashes = {j.summary.get(C.SUMMARY_DATA_HASH) for j in jobs if j.ok}
    tokens = {j.summary.get(C.SUMMARY_TOKENS_SEEN) for j in jobs if j.ok}
    same = "yes" if len(hashes) == 1 and None not in hashes and len(tokens) == 1 else "NO"
    rows = []
    for arm, (best, members) in best_jobs(jobs).items():
        grid = " ".join(f"{j.lr:g}:{j.summary[C.SUMMARY_FINAL_VAL_LOSS]:.4f}" if j.ok else f"{j.lr:g}:failed"
                        for j in sorted(members, key=lambda j: j.lr))
        row: dict[str, Any] = {c: "" for c in COLUMNS}
        row.update({"arm": arm, "lr_grid": grid, "same_data": same, "jobs": len(members)})
        if best is not None:
            s = best.summary
            late_len = s.get(C.SUMMARY_POSITION_EVAL_LEN)
            row.update({
                "best_lr": f"{best.lr:g}",
                "parameters": best.facts.get(C.MODEL_TOTAL_PARAMETERS, ""),
                "tokens": s.get(C.SUMMARY_TOKENS_SEEN, ""),
                "train_flops": s.get(C.SUMMARY_TRAIN_FLOPS, ""),
                "final_train_loss": s.get(C.SUMMARY_FINAL_LOSS, ""),
                "val_loss": s.get(C.SUMMARY_FINAL_VAL_LOSS, ""),
                "val_ppl": s.get(C.SUMMARY_FINAL_VAL_PPL, ""),
                "ppl_within_train": s.get(C.SUMMARY_PPL_WITHIN_TRAIN, ""),
                "ppl_late": s.get(C.SUMMARY_PPL_LATE, ""),
                "late_positions": f"{int(0.75 * late_len)}-{int(late_len)}" if _finite(late_len) else "",
                "passkey_accuracy": s.get(C.SUMMARY_PASSKEY_ACCURACY, ""),
                # steady state: compile and evaluation left out (older runs: the median logged window)
                "tokens_per_sec": s.get(C.SUMMARY_AVG_TOKENS_PER_SEC) or _median(best.train_tps) or "",
            })
        rows.append(row)
    return rows


def to_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(v) for k, v in row.items()})
    return buffer.getvalue()


def _fmt(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else value


def format_table(rows: list[dict[str, Any]]) -> str:
    cols = ("arm", "best_lr", "parameters", "tokens", "val_loss", "val_ppl", "ppl_late", "passkey_accuracy",
            "tokens_per_sec")
    cells = [[str(_fmt(r.get(c, ""))) for c in cols] for r in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)) for line in cells]
    return "\n".join(lines)


def write_study(sweep_dir: Path) -> list[dict[str, Any]]:
    """compare.csv and the three figures in ``sweep_dir``; returns the CSV rows."""
    from tttexp.training import plots

    sweep_dir = Path(sweep_dir)
    jobs = [j for j in (read_job(p) for p in job_dirs(sweep_dir)) if j is not None]
    if not jobs:
        return []
    rows = compare_rows(jobs)
    (sweep_dir / COMPARE_CSV).write_text(to_csv(rows))
    best = {arm: b for arm, (b, _) in best_jobs(jobs).items() if b is not None}
    label = {arm: f"{arm} (lr {b.lr:g})" for arm, b in best.items()}
    seq_len = next((b.seq_len for b in best.values() if b.seq_len), 0)
    tokens = next((b.summary.get(C.SUMMARY_TOKENS_SEEN) for b in best.values()), None)
    budget = f"{int(tokens):,} tokens" if _finite(tokens) else "same tokens"
    same = rows[0]["same_data"] == "yes"
    fair = "same tokens, same order" if same else "DATA DIFFERED"
    plots.plot_compare_loss({label[a]: tuple(zip(*b.val_curve, strict=True)) for a, b in best.items() if b.val_curve},
                            sweep_dir / "compare_loss.png",
                            f"validation loss vs training tokens (context {seq_len}; {budget}; {fair})")
    plots.plot_compare_by_position({label[a]: _csv_rows(b.path / "ppl_by_position.csv") for a, b in best.items()},
                                   sweep_dir / "compare_ppl_by_position.png",
                                   f"perplexity by position on held-out documents (trained at {seq_len})",
                                   train_len=seq_len)
    plots.plot_compare_passkey({label[a]: _csv_rows(b.path / "passkey.csv") for a, b in best.items()},
                               sweep_dir / "compare_passkey.png", "passkey retrieval accuracy (%) by arm")
    return rows


class StudyReport(Callback):
    """Refuse an unfair study before it starts; write compare.csv and the figures when it ends."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        problem = fairness_problem(config)
        if problem:
            print(f"error: {problem}", file=sys.stderr, flush=True)
            sys.exit(2)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            rows = write_study(sweep_dir)
        except Exception as err:  # noqa: BLE001 - a report that cannot be drawn must not fail the sweep
            log.warning(f"could not write the study report in {sweep_dir}: {type(err).__name__}: {err}")
            return
        if rows:
            print(f"\nstudy: {len(rows)} arms -> {sweep_dir / COMPARE_CSV}", flush=True)
            print(format_table(rows), flush=True)
            if rows[0]["same_data"] != "yes":
                print("warning: the jobs did not all consume the same tokens (summary/data_hash differs)",
                      file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_dir():
        print("usage: python -m tttexp.app.study <sweep_dir>", file=sys.stderr)
        sys.exit(2)
    rows = write_study(Path(args[0]))
    print(format_table(rows) if rows else "no jobs found")


if __name__ == "__main__":
    main()
