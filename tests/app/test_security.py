"""What a config may run: exact targets only, on every route (command line, hydra.callbacks, --config-dir YAML),
and no switch that loads code unless model.trust_remote_code opts in."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from support import exit_code_of_the_app
from tttexp.app.preflight import check, compose_config
from tttexp.app.schemas import validate


class _Bomb:
    """Unpickling this creates ``path``: proof that code from the file ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _bomb(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    torch.save({"x": _Bomb(marker)}, evil)
    return evil, marker


def test_a_command_line_target_cannot_unpickle_a_file(tmp_path, monkeypatch, capsys):
    from tttexp.app import train

    evil, marker = _bomb(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["tttexp.train", "logging=none", "logging._target_=torch.load",
                                     f"+logging.f={evil}", "+logging.weights_only=false", "trainer.max_steps=2"])
    with pytest.raises(SystemExit) as stopped:
        train.main()  # the app's entry point: preflight, then Hydra
    assert stopped.value.code == 2
    assert not marker.exists() and not (tmp_path / "outputs").exists()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "logging._target_='torch.load'" in lines[0], lines


def test_a_shared_yaml_cannot_run_code_through_hydra_callbacks(tmp_path, monkeypatch, capsys):
    evil, marker = _bomb(tmp_path)
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "mine.yaml").write_text(textwrap.dedent(f"""\
        defaults:
          - train
          - _self_
        hydra:
          callbacks:
            x:
              _target_: torch.load
              f: {evil}
              weights_only: false
        """))
    monkeypatch.chdir(tmp_path)
    code = exit_code_of_the_app(["--config-dir", str(shared), "--config-name", "mine", "logging=none",
                                 "trainer.max_steps=2", f"hydra.run.dir={tmp_path}/run"])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert not marker.exists()
    assert "hydra.callbacks.x._target_='torch.load'" in err
    assert not (tmp_path / "run").exists()  # refused before Hydra made anything


def test_a_config_dir_group_option_is_checked_too(tmp_path):
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "evil.yaml").write_text(textwrap.dedent("""\
        # @package _global_
        hydra:
          launcher:
            _target_: os.system
        """))
    problem = check(["--config-dir", str(tmp_path), "+extra=evil"])
    assert problem is not None and "hydra.launcher._target_='os.system'" in problem


@pytest.mark.parametrize("argv, expected", [
    (["+model.tok._target_=transformers.AutoTokenizer.from_pretrained", "+model.tok.trust_remote_code=true"],
     "transformers.AutoTokenizer.from_pretrained"),
    (["+hydra.callbacks.y._target_=tttexp.app.sweep_summary.SweepSummary", "+hydra.callbacks.y.trust_remote_code=true"],
     "hydra.callbacks.y.trust_remote_code=true would run code"),
    (["+data.weights_only=false"], "data.weights_only=false would run code"),
    (["logging._target_=tttexp.loggers.jsonl.json.loads"], "not a callable this app builds"),
    (["logging._target_=${oc.env:HOME}"], "must be written out"),
    (["+hydra.job.env_set.LD_PRELOAD=/tmp/x.so"], "LD_PRELOAD"),
    (["hydra.job_logging.handlers.console.class=os.system"], "logging may build only"),
    (["--experimental-rerun", "x.pickle"], "unpickles"),
])
def test_code_running_configs_are_refused_in_one_line(argv, expected):
    problem = check(argv)
    assert problem is not None and expected in problem, problem
    assert "\n" not in problem


def test_trust_remote_code_has_one_opt_in_key():
    assert check(["strategy=from_pretrained", "model.trust_remote_code=true"]) is None


@pytest.mark.parametrize("argv", [[], ["hparams_search=optuna_lr"], ["hparams_search=optuna_ttt"], ["+launcher=local"],
                                  ["+launcher=slurm"], ["strategy=from_pretrained"],
                                  ["strategy=multi_gpu_state_passing"], ["hydra/sweeper/sampler=random",
                                                                         "hparams_search=optuna_lr"]])
def test_the_shipped_configs_and_plugins_stay_allowed(argv):
    validate(compose_config(argv, with_hydra=True))
