"""Every Hydra flag behaves as in any Hydra app; preflight still gives its one-line errors.

The flags that print and stop (--cfg, --info, --help, completion) run in this process; the ones that run a job
(--config-dir/--config-name, --multirun, --experimental-rerun, hydra.verbose) run the app once as a user does.
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import pytest
import yaml

from tttexp.app.train import main


def cli(monkeypatch, *argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run ``tttexp-train argv`` in this process; returns (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["tttexp-train", *argv])
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main()
        except SystemExit as exit_:
            code = exit_.code or 0
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("flag", ["--cfg", "-c"])
def test_cfg_job_prints_the_config_that_runs(monkeypatch, flag):
    code, out, _ = cli(monkeypatch, flag, "job", "strategy=gpu_optimized", "optim.lr=1e-3")
    cfg = yaml.safe_load(out)
    assert code == 0 and "hydra" not in cfg
    assert cfg["optim"]["lr"] == 1e-3 and cfg["trainer"]["precision"] == "bf16" and cfg["strategy"] == "gpu_optimized"


def test_cfg_hydra_and_all_with_resolve(monkeypatch):
    code, out, _ = cli(monkeypatch, "--cfg", "hydra")
    assert code == 0 and set(yaml.safe_load(out)) == {"hydra"}
    code, out, _ = cli(monkeypatch, "--cfg", "all", "--resolve")
    cfg = yaml.safe_load(out)
    assert code == 0 and {"hydra", "model", "trainer"} <= set(cfg)
    assert "${" not in cfg["hydra"]["run"]["dir"] and cfg["data"]["seed"] == cfg["seed"]


def test_package_selects_one_node(monkeypatch):
    code, out, _ = cli(monkeypatch, "--cfg", "job", "--package", "optim", "strategy=conservative")
    assert code == 0 and out.startswith("# @package optim")
    assert yaml.safe_load(out)["lr"] == 1.5e-3


@pytest.mark.parametrize(("topic", "expected"), [("defaults", "Defaults List"), ("config", "Config"),
                                                 ("searchpath", "Config search path"), ("plugins", "Installed Hydra")])
def test_info(monkeypatch, topic, expected):
    code, out, _ = cli(monkeypatch, "--info", topic)
    assert code == 0 and expected in out


def test_help_lists_real_options_only(monkeypatch):
    code, out, _ = cli(monkeypatch, "--help")
    assert code == 0
    assert "strategy: conservative, from_pretrained, gpu_optimized, multi_gpu_state_passing" in out
    assert "model: 1.3b, 125m, 350m, 760m, tiny" in out
    assert "_schema" not in out
    code, out, _ = cli(monkeypatch, "--hydra-help")
    assert code == 0 and "--experimental-rerun" in out and "--shell-completion" in out


def test_shell_completion(monkeypatch):
    code, out, _ = cli(monkeypatch, "-sc", "query=bash", env={"COMP_LINE": "tttexp-train model=1"})
    assert code == 0 and out.split() == ["model=1.3b", "model=125m"]
    code, out, _ = cli(monkeypatch, "-sc", "query=bash", env={"COMP_LINE": "tttexp-train strategy=gpu"})
    assert out.split() == ["strategy=gpu_optimized"]
    code, out, _ = cli(monkeypatch, "--shell-completion", "install=bash")
    assert code == 0 and "hydra_bash_completion" in out


def test_preflight_keeps_its_one_line_errors_next_to_flags(monkeypatch):
    code, out, err = cli(monkeypatch, "--cfg", "job", "trainer.max_stepz=3")
    assert code == 2 and out == ""
    assert err.strip() == "error: trainer.max_stepz: no such config key (did you mean trainer.max_steps?)"


def test_config_dir_verbose_and_rerun(run_app, tmp_path):
    """A user's own config directory and primary config, Hydra's verbose logging, then a rerun of the pickled job."""
    mine = tmp_path / "conf"
    mine.mkdir()
    (mine / "mine.yaml").write_text("defaults:\n  - train\n  - override experiment: smoke\n  - _self_\n"
                                    "trainer:\n  max_steps: 2\n  eval_every: 0\n  position_eval_sequences: 0\n"
                                    "  plots: false\nresume: auto\n")
    run = tmp_path / "run"
    out = run_app("--config-dir", str(mine), "--config-name", "mine", "logging=none", "hydra.verbose=tttexp",
                  f"hydra.run.dir={run}")
    assert out.returncode == 0, out.stderr[-3000:]
    saved = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    assert saved["trainer"]["max_steps"] == 2 and saved["experiment_name"] == "smoke"
    assert "[DEBUG]" in (run / "train.log").read_text()  # hydra.verbose=tttexp turned on tttexp's debug lines

    # The rerun reads the saved YAML, never a pickle: a pickle planted where Hydra would look is not touched.
    marker = tmp_path / "pickle-was-loaded"
    (run / ".hydra" / "config.pickle").write_bytes(
        b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    again = run_app("--experimental-rerun", str(run / ".hydra" / "config.pickle"))
    assert again.returncode == 0, again.stderr[-3000:]
    rerun_dir = again.stdout.rsplit("run directory: ", 1)[1].strip()
    assert rerun_dir != str(run) and "resuming" not in again.stdout  # the same job, into a new directory
    rerun_config = yaml.safe_load((Path(tmp_path, rerun_dir) / ".hydra" / "config.yaml").read_text())
    assert rerun_config["trainer"] == saved["trainer"] and rerun_config["experiment_name"] == "smoke"
    assert not marker.exists()
