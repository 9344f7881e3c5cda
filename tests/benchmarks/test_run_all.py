"""`make bench`'s table: the FSDP row stands beside the unsharded row of the same settings, GPU and day."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import run_all  # noqa: E402


def _train_row(size, checkpointing, tokens_per_sec):
    return {"model": "ttt", "size": size, "ttt_layer": "linear", "context": 2048, "batch": 8, "compiled": "blocks",
            "checkpointing": checkpointing, "tokens_per_sec": tokens_per_sec, "peak_memory_gib": 24.8}


def _fsdp(date, checkpointing, tokens_per_sec):
    return {"benchmark": "fsdp", "device": "GPU X", "date": date, "commit": "0123456789", "size": "1.3b",
            "ttt_layer": "linear", "world_size": 1, "batch_per_rank": 8, "context": 2048, "compile": "blocks",
            "activation_checkpointing": checkpointing, "tokens_per_sec": tokens_per_sec, "peak_memory_gib": 20.0}


def test_fsdp_rows_are_rated_against_the_matching_unsharded_row_only(tmp_path, monkeypatch):
    monkeypatch.setattr(run_all, "RESULTS", tmp_path)
    train = {"device": "GPU X", "date": "2026-12-01", "commit": "abc",
             "rows": [_train_row("1.3b", True, 40000.0), _train_row("1.3b", False, 50000.0)]}
    (tmp_path / "train-1.3b.json").write_text(json.dumps(train))
    (tmp_path / "fsdp-1.3b-a.json").write_text(json.dumps(_fsdp("2026-12-01", True, 30000.0)))
    (tmp_path / "fsdp-1.3b-b.json").write_text(json.dumps(_fsdp("2026-12-02", True, 30000.0)))
    rows = [line for line in run_all.fsdp_lines() if line.startswith("| TTT-")]
    assert len(rows) == 2
    newer, older = rows
    assert "| 0.75 |" in older and "| 24.8 |" in older  # 30k against the checkpointed 40k, not the 50k row
    assert "no unsharded row that day" in newer
    assert "FSDP at world size 1" in run_all.table()


def test_every_run_writes_its_own_dated_file_into_a_results_folder(tmp_path):
    """Runs given the results folder get distinct, dated names (one run's file never overwrites another's)."""
    from common import result_path

    result = {"device": "NVIDIA H100 80GB HBM3", "date": "2026-12-06"}
    for name in ("train-125m-linear", "train-125m-mlp", "decode-125m"):
        assert result_path(result, str(tmp_path), name) == tmp_path / f"{name}-2026-12-06-H100.json"
    assert result_path(result, str(tmp_path / "x" / "mine.json"), "train") == tmp_path / "x" / "mine.json"
    assert (tmp_path / "x").is_dir()
    names = {cmd[cmd.index("--out") + 1] for cmd in run_all.RUNS.values() if "--out" in cmd}
    assert names == {"benchmarks/results"}, names


def test_a_run_cut_short_keeps_every_row_it_measured(tmp_path):
    from common import add_row

    result, path = {"benchmark": "train", "rows": []}, tmp_path / "run.json"
    for i in range(3):
        add_row(result, path, {"i": i})
        assert [r["i"] for r in json.loads(path.read_text())["rows"]] == list(range(i + 1))
