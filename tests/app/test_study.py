"""The comparison study: one smoke-sized multirun over three arms writes compare.csv and the figures, with every
arm on the same tokens in the same order; an unfair study and an unknown arm are refused in one line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from tttexp.app import preflight
from tttexp.app.study import StudyReport, arm_problem, fairness_problem

SMOKE = ["model.hidden_size=32", "model.num_attention_heads=2", "model.intermediate_size=64", "data.seq_len=64",
         "data.batch_size=2", "data.val_windows=2", "trainer.max_steps=4", "trainer.eval_every=2",
         "trainer.log_every=2", "passkey.lengths=[96]", "passkey.depths=[0,1]", "passkey.trials=2",
         "trainer.progress=none", "trainer.position_eval_sequences=2", "trainer.plots=false"]


def test_smoke_study_three_arms_same_tokens(run_app, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    out = run_app("-m", "experiment=compare_tiny", "logging=none", *SMOKE, "optim.lr=3e-3",
                  f"hydra.sweep.dir={sweep}", timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = list(csv.DictReader((sweep / "compare.csv").open()))
    assert [r["arm"] for r in rows] == ["transformer", "ttt_linear", "ttt_mlp"]
    assert all(r["best_lr"] == "0.003" and r["same_data"] == "yes" and float(r["val_loss"]) > 0 for r in rows)
    assert len({r["parameters"] for r in rows}) == 3 and all(int(r["parameters"]) > 0 for r in rows)
    summaries = [json.loads((sweep / str(i) / "summary.json").read_text()) for i in range(3)]
    assert len({s["summary/data_hash"] for s in summaries}) == 1  # the same tokens in the same order
    assert len({s["summary/tokens_seen"] for s in summaries}) == 1 and summaries[0]["summary/tokens_seen"] == 512
    assert all("summary/passkey_accuracy" in s and "summary/ppl_late" in s for s in summaries)
    # the compute each arm spent: more than its parameters' 6 FLOPs a token, the rest in its sequence mixers
    for row in rows:
        assert float(row["train_flops"]) > 6 * int(row["parameters"]) * 512
    for name in ("compare_loss.png", "compare_ppl_by_position.png", "compare_passkey.png"):
        assert (sweep / name).read_bytes()[:4] == b"\x89PNG", name
    assert "study: 3 arms" in out.stdout


def _sweep_config(params: dict, task: list[str] | None = None):
    return OmegaConf.create({"hydra": {"sweeper": {"params": params}, "overrides": {"task": task or []}},
                             "study": {"arm": None}})


def test_a_study_whose_arms_would_see_different_data_is_refused(capsys) -> None:
    fair = _sweep_config({"arm": "transformer,ttt_linear", "optim.lr": "1e-3,3e-3"}, ["model.hidden_size=64"])
    assert fairness_problem(fair) is None
    unfair = _sweep_config({"arm": "transformer,ttt_linear"}, ["data.seq_len=64,128"])
    assert "data.seq_len varies" in fairness_problem(unfair)
    assert "seed varies" in fairness_problem(_sweep_config({"arm": "ttt_mlp", "seed": "0,1"}))
    assert fairness_problem(_sweep_config({"arm": "ttt_mlp", "seed": "0,1"}, ["seed=3"])) is None  # fixed again
    with pytest.raises(SystemExit) as exit_info:
        StudyReport().on_multirun_start(unfair)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: study refused: data.seq_len") and "\n" not in err


def test_an_arm_that_sets_data_is_refused(tmp_path: Path) -> None:
    (tmp_path / "arm").mkdir()
    (tmp_path / "arm" / "cheat.yaml").write_text(yaml.safe_dump({"model": {"mixer": "attention"},
                                                                  "data": {"seq_len": 32}}))
    assert "sets data.seq_len" in arm_problem("cheat", tmp_path)
    assert "not an option" in arm_problem("missing", tmp_path)
    assert arm_problem("transformer") is None and arm_problem("ttt_mlp") is None


def test_unknown_arm_or_mixer_gets_one_line() -> None:
    line = preflight.check(["-m", "experiment=compare_tiny", "arm=transformer,mamba2"])
    assert line is not None and line.startswith("arm=mamba2 is not an option") and "transformer" in line
    line = preflight.check(["experiment=smoke", "model.mixer_types=[ttt,mamba]"])
    assert line is not None and "model.mixer_types[1]" in line and "\n" not in line
