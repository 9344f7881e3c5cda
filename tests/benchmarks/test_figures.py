"""The README's benchmark figures: which run each point comes from, and that the PNGs are drawn from the results."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import figures  # noqa: E402
import run_all  # noqa: E402


def _row(model, tokens_per_sec, context=2048, kernel="triton"):
    return {"model": model, "size": "125m", "context": context, "batch": 8, "ttt_layer": "linear" if model == "ttt"
            else None, "kernel": kernel if model == "ttt" else None, "compiled": True, "checkpointing": False,
            "tokens_per_sec": tokens_per_sec, "peak_memory_gib": 10.0, "mfu": 0.2}


def test_a_point_comes_from_the_newest_run_that_rated_it_not_the_best():
    old = ("2026-11-24", "aaaa", [_row("ttt", 90.0), _row("llama", 100.0)], {("125m", 2048): 100.0})
    new = ("2026-12-06", "bbbb", [_row("ttt", 60.0), _row("ttt", 500.0, kernel="torch"), _row("ttt", 70.0, 8192),
                                  _row("ttt", 48.0), _row("attention", 120.0)], {("125m", 2048): 120.0})
    points = figures.speed_points([new, old], Path("/nonexistent"))
    # 60 / 120: the newer run, its faster mode (48 is, say, eager); 8k has no baseline, torch rows don't count
    assert points == {("linear", "125m"): {2048: 0.5}}


def test_the_profile_groups_lose_no_time():
    classes = {"TTT op fwd": 2.0, "TTT op bwd": 8.0, "GEMM fwd: MLP (width x intermediate)": 3.0,
               "elementwise and other fused bwd": 5.0, "copies and fills": 0.5, "norms fwd": 1.0,
               "idle (no kernel running)": 2.5, "something new": 0.25}
    ((label, groups),) = figures.profile_bars(
        [{"date": "2026-12-06", "commit": "cccc", "rows": [{"model": "TTT-linear", "classes": classes}]}], Path("."))
    assert label == "TTT-linear, cccc"
    assert sum(groups.values()) == sum(classes.values())
    assert groups["TTT op"] == 10.0 and groups["elementwise and fused"] == 5.5 and groups["other"] == 0.25


def test_the_figures_are_drawn_from_the_result_files(tmp_path, monkeypatch):
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    train = {"benchmark": "train", "device": "GPU X", "date": "2026-12-06", "commit": "dddd",
             "rows": [_row("ttt", 80.0), _row("attention", 100.0), _row("ttt", 90.0, 8192), _row("llama", 60.0, 8192)]}
    (results / "train-125m-linear-2026-12-06-X.json").write_text(json.dumps(train))
    profile = {"device": "GPU X", "date": "2026-12-06", "commit": "dddd",
               "rows": [{"model": m, "classes": {"TTT op bwd": 9.0, "GEMM fwd: other": 4.0}} for m in ("a", "b")]}
    (results / "profile-125m-2048-linear-2026-12-06-X.json").write_text(json.dumps(profile))
    monkeypatch.setattr(run_all, "ROOT", tmp_path)
    monkeypatch.setattr(run_all, "RESULTS", results)
    monkeypatch.setattr(run_all, "FIGURES", results / "figures")
    drawn = run_all.draw_figures()
    assert drawn == [results / "figures" / "speed-vs-baseline.png", results / "figures" / "step-profile-125m-2048.png"]
    for path in drawn:
        assert path.read_bytes()[:4] == b"\x89PNG"


def test_the_readme_shows_the_figures_that_run_all_draws():
    readme = (Path(run_all.ROOT) / "README.md").read_text()
    for name in ("speed-vs-baseline.png", "step-profile-125m-2048.png"):
        assert f"(benchmarks/results/figures/{name})" in readme
        assert (run_all.FIGURES / name).is_file()
