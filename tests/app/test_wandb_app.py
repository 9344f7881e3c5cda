"""wandb through the app, for real (offline): read back what each run recorded from its .wandb file."""

from __future__ import annotations

import json
import math

import pytest

from support import records
from tttexp.loggers import find_run_files, read_records, read_run

SMOKE = ["experiment=smoke", "logging=wandb", "logging.mode=offline"]
PROMISED = ["train/loss", "train/learning_rate", "train/tokens_per_sec", "train/grad_norm", "train/tokens_seen",
            "val/loss", "val/ppl", "system/num_processes", "inference/prefill_ms",
            "inference/decode_tokens_per_sec", "warnings/nonfinite_steps", "warnings/loss_spike"]


def run_group(path) -> str:
    for record in read_records(path):
        if record.WhichOneof("record_type") == "run":
            return record.run.run_group
    return ""


def test_what_wandb_recorded_equals_metrics_jsonl(run_app, tmp_path):
    run = tmp_path / "run"
    out = run_app(*SMOKE, "strategy=gpu_optimized", "trainer.inference_every=3", f"hydra.run.dir={run}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert (out.stdout + out.stderr).count("wandb sync") == 1  # one hint; wandb's own banner and summary silenced
    files = find_run_files(run)
    assert len(files) == 1
    recorded = read_run(files[0])
    assert recorded.exit_code == 0
    history_keys = {k for row in recorded.history for k in row}
    assert set(PROMISED) <= history_keys, set(PROMISED) - history_keys

    by_step: dict[int, dict] = {}
    for row in recorded.history:
        by_step.setdefault(int(row["train/step"]), {}).update(row)
    for row in records(run):
        if "step" not in row or "_type" in row:
            continue
        logged = by_step[row["step"]]
        for key, value in row.items():
            if key == "step":
                continue
            if isinstance(value, float) and math.isnan(value):
                assert math.isnan(logged[key])
            elif isinstance(value, int | float) and not isinstance(value, bool):
                assert logged[key] == pytest.approx(value, rel=1e-12), key
            else:
                assert logged[key] == value, key

    assert recorded.config["model"]["hidden_size"] == 64
    assert recorded.config["strategy"] == "gpu_optimized" and recorded.config["system/distributed"] == "single"
    assert recorded.config["optim"]["lr"] == pytest.approx(3e-3)
    assert recorded.config["model/total_parameters"] > 0
    # what is logged is what ran: gpu_optimized fell back to the CPU equivalent, and the facts say so
    assert recorded.config["model/kernel"] == "torch" and recorded.config["trainer/compile"] == "off"
    assert recorded.config["trainer/precision"] == "fp32"
    for key in ("summary/total_time", "summary/avg_tokens_per_sec", "summary/final_loss"):
        assert key in recorded.summary
    assert recorded.summary["model/ttt_layer"] == "linear"

    again = run_app(*SMOKE, "strategy=gpu_optimized", "trainer.max_steps=8", "resume=auto", f"hydra.run.dir={run}")
    assert again.returncode == 0, again.stderr[-3000:]
    ids = {read_run(f).run_id for f in find_run_files(run)}
    assert len(find_run_files(run)) == 2 and len(ids) == 1


def test_multirun_jobs_are_runs_of_one_group(run_app, tmp_path):
    """A sweep of two jobs: a directory each (its own overrides and summary), and two wandb runs of one group."""
    out = run_app("-m", *SMOKE, "model.ttt_layer=linear,mlp", "trainer.max_steps=3", f"hydra.sweep.dir={tmp_path}/s")
    assert out.returncode == 0, out.stderr[-3000:]
    dirs = sorted(p.parent for p in (tmp_path / "s").rglob("metrics.jsonl"))
    assert [d.name for d in dirs] == ["0", "1"]
    assert {json.loads((d / "summary.json").read_text())["summary/steps"] for d in dirs} == {3}
    overrides = [(d / ".hydra" / "overrides.yaml").read_text() for d in dirs]
    assert "model.ttt_layer=linear" in overrides[0] and "model.ttt_layer=mlp" in overrides[1]
    files = find_run_files(tmp_path / "s" / "0") + find_run_files(tmp_path / "s" / "1")
    assert len(files) == 2
    groups = {run_group(f) for f in files}
    assert len(groups) == 1 and groups != {""}
    assert len({read_run(f).run_id for f in files}) == 2


def test_a_self_launched_ddp_job_is_one_run_and_one_wandb_run(run_app, tmp_path):
    """State passing on two CPU processes that the app launches itself: one run directory, rank 0's records with the
    carried state, a log per rank, the job's log with rank 0's console, and one wandb run."""
    run = tmp_path / "run"
    out = run_app(*SMOKE, "strategy=multi_gpu_state_passing", "distributed.nproc_per_node=2",
                  f"hydra.run.dir={run}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    rows = [r for r in records(run) if "train/loss" in r]
    assert rows and all(r["system/num_processes"] == 2 for r in rows)
    assert all("state/w_norm" in r and "state/resets" in r for r in rows)
    assert (run / "train_rank0.log").exists() and (run / "train_rank1.log").exists()
    log = (run / "train.log").read_text()
    assert "step      2/6" in log and "final_val_loss" in log
    files = list(run.rglob("run-*.wandb"))
    assert len(files) == 1
    assert {row.get("system/num_processes") for row in read_run(files[0]).history} >= {2}


def test_training_goes_on_when_wandb_cannot_be_imported(run_app, tmp_path):
    blocker = tmp_path / "no_wandb" / "wandb"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('wandb is blocked for this test')\n")
    out = run_app(*SMOKE, f"hydra.run.dir={tmp_path}/run", python_path=str(blocker.parent))
    assert out.returncode == 0, out.stderr[-3000:]
    said = [line for line in (out.stdout + out.stderr).splitlines() if "wandb" in line.lower()]
    assert len(said) == 1, said
    steps = {r["step"] for r in records(tmp_path / "run") if "train/loss" in r}
    assert steps == {2, 4, 6}


def test_training_goes_on_when_wandb_init_fails(run_app, tmp_path):
    out = run_app(*SMOKE[:2], "logging.mode=online", "logging.init_timeout=5", f"hydra.run.dir={tmp_path}/run",
                  env={"WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_API_KEY": "x" * 40, "WANDB_MODE": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    steps = {r["step"] for r in records(tmp_path / "run") if "train/loss" in r}
    assert steps == {2, 4, 6}
    assert (tmp_path / "run" / "summary.json").exists()
