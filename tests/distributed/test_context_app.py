"""distributed.context_parallel in the app: 10 steps with each sequence split over 2 gloo ranks log the losses of one
process (DDP, FSDP, and state passing: strategy=multi_gpu_state_passing); unfit settings are refused in one line."""

from __future__ import annotations

import json

import pytest

RTOL = 1e-5
COMMON = ("experiment=smoke", "logging=none", "trainer.max_steps=10", "trainer.log_every=1", "trainer.eval_every=5",
          "trainer.progress=none", "trainer.position_eval_sequences=0", "trainer.plots=false", "device=cpu",
          "data.batch_size=2")


def losses(result, tmp_path) -> dict[int, float]:
    assert result.returncode == 0, result.stderr[-3000:]
    [metrics] = list(tmp_path.rglob("metrics.jsonl"))
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    metrics.rename(metrics.with_suffix(".done"))
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


@pytest.mark.extended
@pytest.mark.parametrize("layout", ["ddp", "fsdp", "state_passing"])
def test_context_parallel_run_matches_one_process(run_app, tmp_path, layout):
    recipe = ["strategy=multi_gpu_state_passing"] if layout == "state_passing" else []
    layout = "ddp" if layout == "state_passing" else layout
    one = losses(run_app(*COMMON, *recipe, "distributed=single", "hydra.run.dir=one"), tmp_path)
    split = losses(run_app(*COMMON, *recipe, f"distributed={layout}", "distributed.nproc_per_node=2",
                           "distributed.context_parallel=2", "hydra.run.dir=split"), tmp_path)
    assert sorted(split) == sorted(one) == list(range(1, 11))
    worst = max(abs(split[s] - one[s]) / abs(one[s]) for s in one)
    assert worst < RTOL, f"largest relative loss difference {worst:.2e}"


def test_context_parallel_refusals_come_before_any_process_starts(capsys):
    from support import exit_code_of_the_app

    code = exit_code_of_the_app([*COMMON, "distributed=ddp", "distributed.nproc_per_node=2",
                                 "distributed.context_parallel=2", "model.num_attention_heads=1"])
    err = capsys.readouterr().err
    assert code == 2 and "distributed.context_parallel=2 must divide the attention heads (1)" in err
    assert len(err.strip().splitlines()) == 1
    code = exit_code_of_the_app([*COMMON, "distributed=ddp", "distributed.nproc_per_node=2",
                                 "distributed.context_parallel=2", "data.seq_len=48"])
    assert code == 2 and "must be a multiple of 32" in capsys.readouterr().err
    code = exit_code_of_the_app([*COMMON, "distributed=ddp", "distributed.nproc_per_node=2",
                                 "distributed.context_parallel=2", "trainer.position_eval_sequences=2",
                                 "trainer.position_eval_len=48"])
    err = capsys.readouterr().err
    assert code == 2 and "trainer.position_eval_len=48 must be a multiple of 32" in err
