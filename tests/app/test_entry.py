"""One entry for every app: each hostile route against train, eval and export runs no code; a run refused its
directory leaves that directory byte-identical; a rerun of a finished run goes into a new directory."""

from __future__ import annotations

import pickle
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from support import checksums, exit_code_of_the_app
from tttexp.training import rundir
from tttexp.training.checkpoint import list_checkpoints

APPS = ("train", "eval", "export")
FAST = ["experiment=smoke", "logging=none", "trainer.eval_every=0", "trainer.position_eval_sequences=0",
        "trainer.plots=false"]


class _Bomb:
    """Unpickling this creates ``path``: proof that code from the file ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _callback(evil: Path) -> list[str]:
    return ["+hydra.callbacks.x._target_=torch.load", f"+hydra.callbacks.x.f={evil}",
            "+hydra.callbacks.x.weights_only=false"]


def _route(route: str, app: str, tmp_path: Path, evil: Path, marker: Path) -> list[str]:
    """The command line of one hostile route for ``app``."""
    needs = {"train": [], "eval": [f"checkpoint={evil}"], "export": [f"checkpoint={evil}", f"out={tmp_path}/out"]}
    if route == "callback":
        return [*needs[app], *_callback(evil)]
    if route == "rerun":  # a planted job: the pickle Hydra's rerun would load, and YAML naming the callback
        saved = tmp_path / "planted" / ".hydra"
        saved.mkdir(parents=True)
        (saved / "config.pickle").write_bytes(pickle.dumps(_Bomb(marker)))
        (saved / "overrides.yaml").write_text(yaml.safe_dump(needs[app]))
        (saved / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {
            "job": {"config_name": app}, "runtime": {"output_dir": str(saved.parent)},
            "overrides": {"hydra": _callback(evil)}}}))
        return ["--experimental-rerun", str(saved / "config.pickle")]
    shared = tmp_path / "shared"  # route == "config_dir": a shared YAML built on the eval config
    shared.mkdir()
    (shared / "mine.yaml").write_text(textwrap.dedent(f"""\
        defaults:
          - eval
          - _self_
        checkpoint: {evil}
        hydra:
          callbacks:
            x:
              _target_: torch.load
              f: {evil}
              weights_only: false
        """))
    return ["--config-dir", str(shared), "--config-name", "mine"]


@pytest.mark.parametrize("route", ["callback", "rerun", "config_dir"])
def test_no_route_runs_code_in_any_app(tmp_path, monkeypatch, capsys, route):
    monkeypatch.chdir(tmp_path)
    for app in APPS:
        where = tmp_path / app
        where.mkdir()
        marker, evil = where / "PWNED", where / "evil.pt"
        torch.save({"x": _Bomb(marker)}, evil)
        code = exit_code_of_the_app(_route(route, app, where, evil, marker), app=app)
        err = capsys.readouterr().err
        assert not marker.exists(), f"{app}: code from {evil} ran"
        assert code == 2, f"{app}: {err[-2000:]}"
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and "torch.load" in lines[0], (app, lines)
    assert not (tmp_path / "outputs").exists()  # refused before Hydra made a directory


BUILT: list[object] = []  # each config the training app's validate built while `finished` ran


@pytest.fixture(scope="module")
def finished(tmp_path_factory, app_cache) -> Path:
    """A finished training run with checkpoints (trained in this process)."""
    import os

    from tttexp.app import train

    def counted(cfg):
        BUILT.append(check(cfg))
        return BUILT[-1]

    os.environ["TTTEXP_CACHE_DIR"] = str(app_cache)
    run = tmp_path_factory.mktemp("finished") / "run"
    check, train.validate = train.validate, counted
    try:
        code = exit_code_of_the_app([*FAST, "trainer.max_steps=2", "trainer.ckpt_every=1", f"hydra.run.dir={run}"])
    finally:
        train.validate = check
    assert code in (0, None) and list_checkpoints(run)
    return run


def test_a_job_is_checked_once(finished):
    """Preflight builds the job's configs (every section's checks run then) and the job goes on with them."""
    assert len(BUILT) == 1 and BUILT[0].trainer.max_steps == 2


@pytest.mark.parametrize("app, argv, expected", [
    ("train", ["seed=9", "optim.lr=0.01"], "holds another run's checkpoints"),
    ("train", ["seed=9", "resume=auto"], "belongs to a run with other settings"),
    ("eval", ["checkpoint=CKPT"], "holds a training run"),
    ("train", ["resume=auto", "LOCKED"], "in use by another run"),
])
def test_a_refused_run_leaves_the_directory_byte_identical(finished, capsys, app, argv, expected):
    before = checksums(finished)
    assert ".hydra/config.yaml" in before and "train.log" in before
    held = rundir.RunLock(finished).acquire() if "LOCKED" in argv else None
    argv = [a.replace("CKPT", str(list_checkpoints(finished)[0])) for a in argv if a != "LOCKED"]
    try:
        code = exit_code_of_the_app([*FAST, *argv, f"hydra.run.dir={finished}"], app=app)
    finally:
        if held is not None:
            held.release()
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 1 and len(errors) == 1 and expected in errors[0], errors
    assert checksums(finished) == before


def test_a_rerun_of_a_finished_run_goes_into_a_new_directory(finished, tmp_path, monkeypatch, capsys):
    before = checksums(finished)
    monkeypatch.chdir(tmp_path)
    code = exit_code_of_the_app(["--experimental-rerun", str(finished / ".hydra" / "config.pickle")])
    assert code in (0, None), capsys.readouterr().err[-2000:]
    (new,) = [p.parent for p in (tmp_path / "outputs").rglob("summary.json")]
    assert yaml.safe_load((new / ".hydra" / "overrides.yaml").read_text()) == \
        yaml.safe_load((finished / ".hydra" / "overrides.yaml").read_text())
    assert [p.name for p in list_checkpoints(new)] == [p.name for p in list_checkpoints(finished)]
    assert checksums(finished) == before
