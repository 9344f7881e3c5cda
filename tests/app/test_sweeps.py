"""Sweeps: Optuna search presets, the SLURM/local launcher presets and the multirun summary.

The end-to-end tests run the real app, the real Optuna sweeper and submitit's local executor on the CPU.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.utils import JobReturn, JobStatus
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tttexp.app.preflight import CONF_DIR, check, compose_config
from tttexp.app.schemas import register_configs, validate
from tttexp.app.sweep_summary import SUMMARY_CSV, collect, failure_line, format_table, to_csv, write_summary

SMOKE = ["experiment=smoke", "logging=none"]
FAST = [*SMOKE, "trainer.plots=false", "trainer.position_eval_sequences=0"]  # no end-of-run extras
HPARAMS = sorted(p.stem for p in (CONF_DIR / "hparams_search").glob("*.yaml"))
LAUNCHERS = sorted(p.stem for p in (CONF_DIR / "launcher").glob("*.yaml"))
quiet_sqlalchemy = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # optuna 2.10 on SQLAlchemy 1.4


def compose_full(overrides: list[str]) -> DictConfig:
    """The whole config, Hydra's own node included (what a launcher and a sweeper are built from)."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


# --------------------------------------------------------------------------------------------------------------
# The summary, on synthetic sweep directories
# --------------------------------------------------------------------------------------------------------------


def make_job(sweep: Path, name: str, overrides: list[str], summary: dict | None = None,
             records: list[dict] | None = None) -> Path:
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(overrides)))
    if summary is not None:
        (job / "summary.json").write_text(json.dumps(summary))
    if records is not None:
        (job / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return job


def finished(failed: bool = False) -> list[dict]:
    return [{"_type": "start", "time": 1.0, "appended": False}, {"step": 1, "train/loss": 3.0},
            {"_type": "finish", "time": 2.0, "failed": failed}]


def summary_of(loss: float, val: float, ppl: float, tps: float) -> dict:
    return {"summary/final_loss": loss, "summary/final_val_loss": val, "summary/final_val_ppl": ppl,
            "summary/avg_tokens_per_sec": tps, "summary/steps": 3}


def test_summary_rows_statuses_and_order(tmp_path):
    sweep = tmp_path / "sweep"
    common = ["experiment=smoke", "logging=none"]
    make_job(sweep, "0", [*common, "model.ttt_layer=linear", "optim.lr=0.001"], summary_of(3.5, 3.6, 36.6, 1200.0),
             finished())
    make_job(sweep, "10", [*common, "model.ttt_layer=mlp", "optim.lr=0.003"], summary_of(3.1, 3.2, 24.5, 900.5),
             finished())
    make_job(sweep, "2", [*common, "model.ttt_layer=mlp", "optim.lr=0.001"])  # died before its logger started
    make_job(sweep, "3", [*common, "model.ttt_layer=linear", "optim.lr=0.003"], summary_of(9.0, 9.1, 8000.0, 50.0),
             finished(failed=True))  # the run raised; the logger still wrote its summary so far
    make_job(sweep, "4", [*common, "model.ttt_layer=linear", "optim.lr=0.01"], summary_of(4.0, 4.1, 60.0, 10.0),
             [*finished(), {"_type": "start", "time": 3.0, "appended": True}])  # restarted, never finished
    (sweep / ".submitit" / "123").mkdir(parents=True)  # launcher files are not jobs
    (sweep / "0" / "checkpoints").mkdir()

    rows = collect(sweep)
    assert [r.job for r in rows] == ["0", "2", "3", "4", "10"]
    assert [r.status for r in rows] == ["ok", "failed", "failed", "failed", "ok"]
    assert rows[0].metrics == {"final_loss": 3.5, "final_val_loss": 3.6, "final_val_ppl": 36.6,
                               "tokens_per_sec": 1200.0}
    assert rows[1].metrics == {}

    written = write_summary(sweep)
    assert [r.job for r in written] == [r.job for r in rows]
    table = read_csv(sweep / SUMMARY_CSV)
    assert list(table[0]) == ["job", "status", "overrides", "model.ttt_layer", "optim.lr", "final_loss",
                              "final_val_loss", "final_val_ppl", "tokens_per_sec"]
    assert table[0]["overrides"] == "experiment=smoke logging=none model.ttt_layer=linear optim.lr=0.001"
    assert (table[0]["model.ttt_layer"], table[0]["optim.lr"], float(table[0]["final_val_ppl"])) == \
        ("linear", "0.001", 36.6)
    assert table[1]["status"] == "failed" and table[1]["final_loss"] == ""
    assert float(table[4]["tokens_per_sec"]) == 900.5


def test_printed_table_shows_what_varied(tmp_path):
    sweep = tmp_path / "sweep"
    make_job(sweep, "0", ["experiment=smoke", "model.ttt_layer=linear"], summary_of(3.5, 3.61234, 36.6, 12345.6),
             finished())
    make_job(sweep, "1", ["experiment=smoke", "model.ttt_layer=mlp"])
    lines = format_table(collect(sweep)).splitlines()
    assert lines[0].split() == ["job", "status", "model.ttt_layer", "final_loss", "final_val_loss", "final_val_ppl",
                                "tokens_per_sec"]
    assert lines[2].split() == ["0", "ok", "linear", "3.5000", "3.6123", "36.60", "12,346"]
    assert lines[3].split() == ["1", "failed", "mlp", "-", "-", "-", "-"]
    assert "experiment" not in lines[0]  # the same in every job


def test_single_job_table_lists_its_overrides_and_nested_job_dirs_are_found(tmp_path):
    sweep = tmp_path / "sweep"
    make_job(sweep, "lr=0.1/seed=1", ["optim.lr=0.1", "seed=1"], summary_of(1.0, 2.0, 7.39, 5.0), finished())
    rows = collect(sweep)
    assert [r.job for r in rows] == ["lr=0.1/seed=1"]
    assert "optim.lr=0.1 seed=1" in format_table(rows)
    assert to_csv(rows).splitlines()[0] == "job,status,overrides,final_loss,final_val_loss,final_val_ppl," \
                                           "tokens_per_sec"


def test_empty_directory_writes_nothing(tmp_path):
    assert write_summary(tmp_path) == []
    assert not (tmp_path / SUMMARY_CSV).exists()


def test_failure_line_names_the_job_its_overrides_and_the_root_cause():
    ret = JobReturn()
    ret.status = JobStatus.FAILED
    ret.overrides = ["optim.lr=0.5", "model.ttt_layer=mlp"]
    ret.hydra_cfg = OmegaConf.create({"hydra": {"job": {"num": 7}}})
    try:
        try:
            raise ValueError("data.val_windows must be positive,\n got 0")
        except ValueError as inner:
            raise RuntimeError("Error in call to target 'tttexp.data.module.DataModule'") from inner
    except RuntimeError as outer:
        ret.return_value = outer
    line = failure_line(ret)
    assert line == "job 7 failed: ValueError: data.val_windows must be positive, got 0 " \
                   "[optim.lr=0.5 model.ttt_layer=mlp]"


def test_only_a_multirun_job_gets_the_sweep_failure_line(tmp_path, caplog):
    from tttexp.app.sweep_summary import SweepSummary

    ret = JobReturn()
    ret.status = JobStatus.FAILED
    ret.return_value = RuntimeError("boom")
    single = OmegaConf.create({"hydra": {"mode": "RunMode.RUN", "job": {"num": None}, "run": {"dir": str(tmp_path)}}})
    with caplog.at_level("ERROR"):
        SweepSummary().on_job_end(config=single, job_return=ret)
    assert "failed" not in caplog.text  # a single run reports its own error; nothing from sweep code
    many = OmegaConf.create({"hydra": {"mode": "RunMode.MULTIRUN", "job": {"num": 3},
                                       "sweep": {"dir": str(tmp_path)}}})
    with caplog.at_level("ERROR"):
        SweepSummary().on_job_end(config=many, job_return=ret)
    assert "job ? failed: RuntimeError: boom" in caplog.text


# --------------------------------------------------------------------------------------------------------------
# Presets compose and build
# --------------------------------------------------------------------------------------------------------------


def test_presets_exist_and_train_yaml_registers_them():
    assert {"optuna_lr", "optuna_ttt"} <= set(HPARAMS)
    assert {"local", "slurm"} <= set(LAUNCHERS)
    cfg = compose_full([])
    assert cfg.hydra.callbacks.sweep_summary._target_ == "tttexp.app.sweep_summary.SweepSummary"
    assert instantiate(cfg.hydra.callbacks.sweep_summary).__class__.__name__ == "SweepSummary"
    assert cfg.hydra.runtime.choices["hparams_search"] is None


@quiet_sqlalchemy
@pytest.mark.parametrize("name", HPARAMS)
def test_hparams_search_presets_compose_and_build_a_real_optuna_sweeper(name):
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
    from optuna.distributions import LogUniformDistribution
    from optuna.samplers import TPESampler

    overrides = [f"hparams_search={name}", "experiment=125m_ttt_linear_2k"]
    validate(compose_config(overrides))
    cfg = compose_full(overrides)
    sweeper_cfg = cfg.hydra.sweeper
    assert cfg.hydra.runtime.choices["hydra/sweeper"] == "optuna"
    assert sweeper_cfg.direction == "minimize" and sweeper_cfg.n_trials > 1
    assert sweeper_cfg.max_failure_rate == 1.0  # a failed trial never stops the search
    assert isinstance(instantiate(sweeper_cfg), OptunaSweeper)
    sampler = instantiate(sweeper_cfg.sampler)
    assert isinstance(sampler, TPESampler)
    assert sweeper_cfg.sampler.seed == 0
    space, fixed = create_params_from_overrides([f"{k}={v}" for k, v in sweeper_cfg.params.items()])
    assert not fixed
    assert space["optim.lr"] == LogUniformDistribution(1e-4, 1e-2)
    assert sweeper_cfg.study_name.startswith("125m_ttt_linear_2k")


def test_preflight_checks_optuna_ranges_at_both_ends():
    assert check(["-m", "hparams_search=optuna_lr", *SMOKE, "optim.warmup_steps=int(interval(0,10))"]) is None
    assert check(["-m", "hparams_search=optuna_ttt", *SMOKE, "optim.lr=tag(log,interval(1e-5,1e-1))"]) is None
    problem = check(["-m", "hparams_search=optuna_lr", *SMOKE, "optim.min_lr_ratio=interval(0.5,1.5)"])
    assert problem == "optim.min_lr_ratio=1.5 must be between 0 and 1"
    assert check(["-m", "hparams_search=nope"]) == "hparams_search=nope is not an option; choose one of: " + \
        ", ".join(HPARAMS)


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_presets_compose_resume_and_instantiate(name):
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher

    cfg = compose_full([f"+launcher={name}", "experiment=125m_ttt_mlp_2k", "hparams_search=optuna_lr"])
    assert cfg.resume == "auto"  # a requeued job continues from its newest checkpoint
    assert cfg.hydra.runtime.choices["hydra/launcher"] == f"submitit_{name}"
    assert cfg.hydra.runtime.choices["hydra/sweeper"] == "optuna"
    assert OmegaConf.to_container(cfg.hydra.sweep)["subdir"] == "${hydra.job.num}"  # one directory per job
    launcher = instantiate(cfg.hydra.launcher)
    assert isinstance(launcher, BaseSubmititLauncher)
    assert launcher.params["name"] == "125m_ttt_mlp_2k"
    assert launcher.params["submitit_folder"].startswith(str(cfg.hydra.sweep.dir))
    assert check(["-m", f"+launcher={name}", *SMOKE, "optim.lr=1e-3,3e-3"]) is None


def test_slurm_preset_makes_a_requeueing_one_task_per_gpu_batch_script(tmp_path, monkeypatch):
    """The sbatch script submitit writes from the preset (a stub ``srun`` passes submitit's cluster check)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")

    cfg = compose_full(["+launcher=slurm", "experiment=350m_ttt_linear_2k", "hydra.launcher.partition=gpu",
                        f"hydra.sweep.dir={tmp_path}/sweep"])
    params = instantiate(cfg.hydra.launcher).params
    # What SlurmLauncher.launch does with its parameters before submitting.
    executor = submitit.AutoExecutor(cluster="slurm", folder=params["submitit_folder"],
                                     slurm_max_num_timeout=params["max_num_timeout"])
    shared = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in shared else f"slurm_{k}": v for k, v in params.items()
                                  if k not in {"submitit_folder", "max_num_timeout"}})
    script = executor._executor._make_submission_file_text("python -m submitit.core._submit x", "uid")
    for line in ("#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8", "#SBATCH --nodes=1",
                 "#SBATCH --signal=USR2@300", "#SBATCH --time=1440", "#SBATCH --partition=gpu",
                 "#SBATCH --job-name=350m_ttt_linear_2k", "#SBATCH --open-mode=append"):
        assert line in script.splitlines(), line
    assert executor._executor.max_num_timeout == 20
    assert f"{tmp_path}/sweep/.submitit/" in script


# --------------------------------------------------------------------------------------------------------------
# End to end on the CPU
# --------------------------------------------------------------------------------------------------------------


def job_summaries(sweep: Path) -> dict[str, dict]:
    return {d.name: json.loads((d / "summary.json").read_text()) for d in sorted(sweep.iterdir())
            if (d / "summary.json").exists()}


@quiet_sqlalchemy
def test_optuna_sweep_minimises_the_validation_loss_the_app_returns(run_app, tmp_path):
    import optuna

    db = tmp_path / "study.db"
    out = run_app("-m", "hparams_search=optuna_lr", *FAST, "hydra.sweeper.n_trials=2", "trainer.max_steps=2",
                  f"hydra.sweep.dir={tmp_path}/sweep", f"hydra.sweeper.storage=sqlite:///{db}")
    assert out.returncode == 0, out.stderr[-3000:]
    sweep = tmp_path / "sweep"
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    assert results.name == "optuna" and "optim.lr" in results.best_params

    summaries = job_summaries(sweep)
    assert sorted(summaries) == ["0", "1"]
    trials = optuna.load_study(study_name="smoke-lr", storage=f"sqlite:///{db}").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    for trial in trials:  # each trial's value is its job's final validation loss
        job = sweep / str(trial.number)
        assert trial.value == pytest.approx(summaries[job.name]["summary/final_val_loss"])
        assert f"optim.lr={trial.params['optim.lr']}" in (job / ".hydra" / "overrides.yaml").read_text()
    assert results.best_value == pytest.approx(min(t.value for t in trials))

    rows = read_csv(sweep / SUMMARY_CSV)
    assert [(r["job"], r["status"]) for r in rows] == [("0", "ok"), ("1", "ok")]
    assert "sweep summary: 2 jobs, 0 failed" in out.stdout


def test_a_failing_trial_is_reported_and_the_search_goes_on(run_app, tmp_path):
    # data.seq_len=4194304 passes the command-line checks and fails inside the job: the corpus holds fewer windows
    # of that length than one batch needs, which only reading it tells.
    out = run_app("-m", "hparams_search=optuna_lr", *FAST, "hydra.sweeper.n_trials=2", "trainer.max_steps=1",
                  "data.seq_len=choice(64,4194304)", f"hydra.sweep.dir={tmp_path}/sweep")
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    failures = [line for line in text.splitlines() if "failed: ValueError: the training split gives 0" in line]
    assert len(failures) == 1, text[-3000:]
    assert "data.seq_len=4194304" in failures[0] and "optim.lr=" in failures[0]
    sweep = tmp_path / "sweep"
    rows = {r["data.seq_len"]: r for r in read_csv(sweep / SUMMARY_CSV)}
    assert rows["4194304"]["status"] == "failed" and rows["64"]["status"] == "ok"
    assert OmegaConf.load(sweep / "optimization_results.yaml").best_params["data.seq_len"] == 64


def test_multirun_writes_summary_csv_and_prints_the_table(run_app, tmp_path):
    out = run_app("-m", *FAST, "model.ttt_layer=linear,mlp", "trainer.max_steps=2",
                  f"hydra.sweep.dir={tmp_path}/sweep")
    assert out.returncode == 0, out.stderr[-3000:]
    sweep = tmp_path / "sweep"
    rows = read_csv(sweep / SUMMARY_CSV)
    assert [(r["job"], r["status"], r["model.ttt_layer"]) for r in rows] == [("0", "ok", "linear"), ("1", "ok", "mlp")]
    summaries = job_summaries(sweep)
    for row in rows:
        summary = summaries[row["job"]]
        assert float(row["final_loss"]) == pytest.approx(summary["summary/final_loss"])
        assert float(row["final_val_ppl"]) == pytest.approx(summary["summary/final_val_ppl"])
        assert float(row["tokens_per_sec"]) == pytest.approx(summary["summary/avg_tokens_per_sec"])
    table = out.stdout[out.stdout.index("sweep summary: 2 jobs, 0 failed"):].splitlines()
    assert table[1].split()[:3] == ["job", "status", "model.ttt_layer"]
    assert table[3].split()[:3] == ["0", "ok", "linear"] and table[4].split()[:3] == ["1", "ok", "mlp"]


def _task_pids(under: Path) -> list[int]:
    """Processes running a submitit task whose job folder is under ``under`` (submitit's local job processes)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if "submitit.core._submit" in cmdline and str(under) in cmdline:
            pids.append(int(proc.name))
    return pids


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds the job's process through /proc")
def test_local_launcher_requeues_a_signalled_job_which_resumes_from_its_checkpoint(app_cache, tmp_path):
    """USR2 (what SLURM sends before a time limit) makes submitit requeue; the job resumes in its own directory.

    The default, time-stamped sweep directory is used: the requeued job must land in the same one.
    """
    steps = 12  # the signal comes after the first checkpoint (step 2); a late one resumes at the end: same result
    env = {**os.environ, "TTTEXP_CACHE_DIR": str(app_cache), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "tttexp.train", "-m", "+launcher=local", *FAST, f"trainer.max_steps={steps}",
           "trainer.ckpt_every=2", "trainer.eval_every=0"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not list(tmp_path.glob("outputs/multirun/*/*/0/checkpoints/step-*.pt")):
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint before the deadline"
            time.sleep(0.2)
        pids = _task_pids(tmp_path)
        assert len(pids) == 1, pids
        os.kill(pids[0], signal.SIGUSR2)
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-3000:]

    sweeps = list(tmp_path.glob("outputs/multirun/*/*"))
    assert len(sweeps) == 1, sweeps
    sweep, job = sweeps[0], sweeps[0] / "0"
    logs = "".join(p.read_text() for p in (sweep / ".submitit").glob("*/*_0_log.*"))
    assert "Requeued job" in logs, logs[-3000:]
    resumed = [line for line in logs.splitlines() if line.startswith(f"resuming from {job}/checkpoints/step-")]
    assert len(resumed) == 1, logs[-3000:]
    records = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["appended"] for r in records if r.get("_type") == "start"] == [False, True]
    assert json.loads((job / "summary.json").read_text())["summary/steps"] == steps
    assert [(r["job"], r["status"]) for r in read_csv(sweep / SUMMARY_CSV)] == [("0", "ok")]
